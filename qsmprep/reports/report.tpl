<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="qsmprep (nireports assembler)">
<title>{{ title }}</title>
<style>
body { font-family: Helvetica, Arial, sans-serif; margin: 0; color: #212529; }
nav { position: sticky; top: 0; background: #f8f9fa; border-bottom: 1px solid #dee2e6;
      padding: 0.4em 1.5em; z-index: 10; }
nav a { margin-right: 1.2em; color: #0d6efd; text-decoration: none; }
main { padding: 0 1.5em 3em; max-width: 1100px; }
h1.sub-report-title { border-bottom: 2px solid #dee2e6; padding-top: 1em; }
h2 { font-size: 1.3em; margin-top: 1.5em; } h3 { font-size: 1.1em; }
.bids-entity { font-family: monospace; background: #eef; padding: 0 0.3em; }
.reportlet img { background: #000; display: block; }
small { color: #6c757d; }
.elem-caption { color: #495057; max-width: 60em; }
table.qsmprep-summary { border-collapse: collapse; margin: 0.5em 0; }
table.qsmprep-summary th { text-align: left; padding: 0.2em 1.5em 0.2em 0; vertical-align: top;
                           font-weight: 600; }
table.qsmprep-summary td { padding: 0.2em 0; }
table.qsmprep-summary ul { margin: 0; padding-left: 1.2em; }
.qsmprep-warnings { background: #fff3cd; border: 1px solid #ffe69c; padding: 0.5em 1em; }
.qsmprep-error, .alert-danger { background: #f8d7da; border: 1px solid #f1aeb5;
                                padding: 0.5em 1em; }
.qsmprep-ok, .alert-success { background: #d1e7dd; padding: 0.5em 1em; }
.nav-tabs { list-style: none; padding: 0; display: flex; border-bottom: 1px solid #dee2e6; }
.nav-link { border: 1px solid transparent; background: none; padding: 0.4em 1em; cursor: pointer; }
.nav-link.active { border-color: #dee2e6 #dee2e6 #fff; background: #fff; }
.tab-pane { display: none; } .tab-pane.active { display: block; }
.tab-pane pre, details pre { white-space: pre-wrap; background: #f8f9fa; padding: 0.5em; }
#qc-banner { display: none; background: #f8d7da; padding: 0.5em 1.5em; }
</style>
{% for hh in header %}
{{ hh }}
{% endfor %}
</head>
<body>
<nav>
{% for sub_report in sections %}
<a href="#{{ sub_report.name }}">{{ sub_report.name }}</a>
{% endfor %}
{% for item in navbar %}
{{ item }}
{% endfor %}
</nav>
<div id="qc-banner" role="alert"></div>
<main>
{% for sub_report in sections %}
  {% if sub_report.reportlets %}
  <div id="{{ sub_report.name }}">
  <h1 class="sub-report-title">{{ sub_report.name }}</h1>
  {% for run_report in sub_report.reportlets %}
    <div id="{{ run_report.name }}">
      {% if run_report.title %}<h2 class="sub-report-group">{{ run_report.title }}</h2>{% endif %}
      {% if run_report.subtitle %}<h3 class="run-title">{{ run_report.subtitle }}</h3>{% endif %}
      {% if run_report.description %}<p class="elem-desc">{{ run_report.description }}</p>{% endif %}
      {% for elem in run_report.components %}
        {% if elem[0] %}
          {% if elem[1] %}<p class="elem-caption">{{ elem[1] }}</p>{% endif %}
          {{ elem[0] }}
        {% endif %}
      {% endfor %}
    </div>
  {% endfor %}
  </div>
  {% endif %}
{% endfor %}
</main>
{% for ff in footer %}
{{ ff }}
{% endfor %}
<script>
// Tabs of the methods section (no external libraries: the report works offline).
document.querySelectorAll('.nav-link[data-bs-target]').forEach(function (button) {
  button.addEventListener('click', function () {
    document.querySelectorAll('.nav-link[data-bs-target]').forEach(function (b) {
      b.classList.remove('active');
    });
    document.querySelectorAll('.tab-pane').forEach(function (p) { p.classList.remove('active'); });
    button.classList.add('active');
    document.querySelector(button.getAttribute('data-bs-target')).classList.add('active');
  });
});
// Self-check: count the figures that loaded and warn visibly about the others.
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.querySelectorAll('.reportlet img'));
  var broken = images.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  document.body.setAttribute('data-figures-total', images.length);
  document.body.setAttribute('data-figures-loaded', images.length - broken.length);
  if (broken.length) {
    var banner = document.getElementById('qc-banner');
    banner.textContent = broken.length + ' figure(s) could not be displayed: ' +
      broken.map(function (im) { return im.getAttribute('src'); }).join(', ');
    banner.style.display = 'block';
  }
});
</script>
</body>
</html>
