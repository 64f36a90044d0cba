#!/usr/bin/env bash
# `make test-container`: build the qsmprep image (from a local debootstrapped base when no
# registry is reachable), run the demo in it and check it against a host run:
#   - the container's Chimap equals the host run's to float tolerance (compare_runs.py);
#   - sidecars and the HTML report are written;
#   - the input dataset (mounted read-only) is unchanged;
#   - every output is owned by the user the container ran as (--user UID:GID);
#   - a read-only output folder gives qsmprep's clear error, exit code 1.
# Environment: BIN (host venv bin/, default .venv/bin), IMAGE (default qsmprep:test),
# BASE_IMAGE (default debian:bookworm-slim), OUT (default .container-test),
# RUN_UID/RUN_GID (default: the caller; 4242 when the caller is root, so that ownership is
# really tested), SKIP_BUILD=1 to reuse an image, NPROCS (default 2).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
# shellcheck source=docker_env.sh
. "$REPO/bids_app_bootstrap/host/docker_env.sh"

BIN=${BIN:-$REPO/.venv/bin}
IMAGE=${IMAGE:-qsmprep:test}
OUT=${OUT:-$REPO/.container-test}
NPROCS=${NPROCS:-2}
RUN_UID=${RUN_UID:-$(id -u)}
RUN_GID=${RUN_GID:-$(id -g)}
if [ "$RUN_UID" = 0 ]; then RUN_UID=4242 RUN_GID=4242; fi
DOCKERD_LOG=${DOCKERD_LOG:-$OUT/dockerd.log}
mkdir -p "$OUT"
export DOCKERD_LOG

# A setting of this machine's pip (`pip config list`: environment first, then the files).
pip_setting() {
    "$BIN/python" -m pip config list 2>/dev/null | "$BIN/python" -c '
import sys
key, found = sys.argv[1], {}
for line in sys.stdin:
    name, sep, value = line.strip().partition("=")
    if sep and name.rsplit(".", 1)[-1] == key:
        found.setdefault(name.startswith(":env:"), value.strip("\x27\""))
print(found.get(True) or found.get(False) or "")' "$1"
}

ensure_docker
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    base=$(ensure_base_image "${BASE_IMAGE:-debian:bookworm-slim}")
    cli=$(build_cli)
    # local wheels (e.g. the CPU torch of this machine's pip find-links) into the context's
    # .docker-wheels/ (gitignored); the machine's pip CA bundle as a build secret
    build_args=(--build-arg "BASE_IMAGE=$base"
                --build-arg "VERSION=$("$BIN/python" -c 'import qsmprep; print(qsmprep.__version__)' 2>/dev/null || echo unknown)"
                --build-arg "VCS_REF=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
    mkdir -p .docker-wheels
    links=$(pip_setting find-links)
    torch_wheel=""
    for dir in $links; do
        for whl in "$dir"/torch-2.13.0+cpu-*.whl; do [ -f "$whl" ] && torch_wheel=$whl; done
    done
    if [ -n "$torch_wheel" ]; then
        ln -f "$torch_wheel" .docker-wheels/ 2>/dev/null || cp "$torch_wheel" .docker-wheels/
        build_args+=(--build-arg "TORCH_INDEX_URL=")  # the local CPU wheel, no extra index
        log "local torch wheel: $torch_wheel"
    fi
    # the host venv's versions as constraints: the comparison below tests the container,
    # not version drift (numpy/scipy releases move the BET mask by a few voxels)
    "$BIN/python" -m pip freeze --exclude-editable 2>/dev/null \
        | grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^(torch|qsmprep)==' \
        >.docker-wheels/constraints.txt || true
    log "pinned $(wc -l <.docker-wheels/constraints.txt) versions of the host venv"
    # TemplateFlow's server unreachable (an offline build machine): the skeleton only
    # (any HTTP answer, even an error status, means the server is reachable)
    if ! "$BIN/python" -c '
import urllib.error, urllib.request
try:
    urllib.request.urlopen("https://templateflow.s3.amazonaws.com", timeout=8)
except urllib.error.HTTPError:
    pass' 2>/dev/null; then
        build_args+=(--build-arg "PREFETCH_TEMPLATES=0")
        log "TemplateFlow unreachable: building without the templates of templates.txt"
    fi
    cert=$(pip_setting cert)
    if [ -n "$cert" ] && [ -f "$cert" ]; then
        build_args+=(--secret "id=pip_cert,src=$cert")
        log "pip CA bundle passed as a build secret: $cert"
    fi
    log "building $IMAGE from $base with $cli (log: $OUT/build.log)"
    start=$(date +%s)
    DOCKER_BUILDKIT=1 nice -n 10 "$cli" build --progress=plain -t "$IMAGE" \
        "${build_args[@]}" . >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    log "built in $(( $(date +%s) - start )) s; size $(docker image inspect -f '{{.Size}}' "$IMAGE") bytes"
fi

rm -rf "$OUT/container" "$OUT/readonly"
if [ "${REUSE_HOST:-0}" = 1 ] && [ -s "$OUT/host/out/sub-01/anat/sub-01_Chimap.nii.gz" ]; then
    log "reusing the host run in $OUT/host (REUSE_HOST=1)"
else
    log "demo data (qsmprep-sim on the host, as make demo)"
    rm -rf "$OUT/bids" "$OUT/host"
    PATH="$BIN:$PATH" bash bids_app_bootstrap/make_demo_data.sh "$OUT/bids" >/dev/null
    ( cd "$OUT/bids" && find . -type f -print0 | sort -z | xargs -0 sha256sum ) >"$OUT/bids.sha256"
    log "host run"
    start=$(date +%s)
    nice -n 10 "$BIN/qsmprep" "$OUT/bids" "$OUT/host/out" participant -w "$OUT/host/work" \
        --nprocs "$NPROCS" >"$OUT/host.log" 2>&1 || { tail -30 "$OUT/host.log"; exit 1; }
    log "host run took $(( $(date +%s) - start )) s"
fi

log "container run as $RUN_UID:$RUN_GID (input read-only)"
mkdir -p "$OUT/container/out" "$OUT/container/work"
chown "$RUN_UID:$RUN_GID" "$OUT/container/out" "$OUT/container/work" 2>/dev/null || true
start=$(date +%s)
nice -n 10 docker run --rm --user "$RUN_UID:$RUN_GID" \
    -v "$OUT/bids:/data:ro" -v "$OUT/container/out:/out" -v "$OUT/container/work:/scratch" \
    "$IMAGE" /data /out participant -w /scratch --nprocs "$NPROCS" \
    >"$OUT/container.log" 2>&1 || { tail -30 "$OUT/container.log"; exit 1; }
log "container run took $(( $(date +%s) - start )) s"
grep -q "qsmprep-container | device: " "$OUT/container.log" \
    || { log "FAIL: no device banner in the container log"; exit 1; }

log "checks"
( cd "$OUT/bids" && sha256sum --quiet -c "$OUT/bids.sha256" ) \
    || { log "FAIL: the input dataset changed"; exit 1; }
[ "$(cd "$OUT/bids" && find . -type f | wc -l)" = "$(wc -l <"$OUT/bids.sha256")" ] \
    || { log "FAIL: files were added to the input dataset"; exit 1; }
foreign=$(find "$OUT/container/out" "$OUT/container/work" \( ! -uid "$RUN_UID" -o ! -gid "$RUN_GID" \) | head -5)
[ -z "$foreign" ] || { log "FAIL: outputs not owned by $RUN_UID:$RUN_GID: $foreign"; exit 1; }
"$BIN/python" bids_app_bootstrap/host/compare_runs.py "$OUT/host/out" "$OUT/container/out" \
    | tee "$OUT/compare.txt"

mkdir -p "$OUT/readonly"
set +e
docker run --rm --user "$RUN_UID:$RUN_GID" -v "$OUT/bids:/data:ro" \
    -v "$OUT/readonly:/out:ro" "$IMAGE" /data /out participant -w /tmp/work \
    >"$OUT/readonly.log" 2>&1
rc=$?
set -e
if [ "$rc" != 1 ] || ! grep -q "qsmprep: error: The output folder /out is not writable" "$OUT/readonly.log"; then
    log "FAIL: read-only output folder: exit code $rc, expected 1 and a clear error:"
    cat "$OUT/readonly.log"; exit 1
fi
grep "qsmprep: error" "$OUT/readonly.log" >&2
log "image size: $(docker image inspect -f '{{.Size}}' "$IMAGE") bytes"
log "PASSED"
