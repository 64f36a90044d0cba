# qsmprep BIDS App image. Build (CPU image, the default):
#   DOCKER_BUILDKIT=1 docker build -t qsmprep:latest .
# CUDA image (torch built for CUDA 12.8, on NVIDIA's CUDA runtime base; run with --gpus all):
#   DOCKER_BUILDKIT=1 docker build -t qsmprep:latest-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_SPEC=torch==2.13.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Offline/air-gapped builds (as `make test-container` does): a local base image, the CA
# bundle of the build machine as a BuildKit secret and local wheels in .docker-wheels/;
# see docs/containers.md. No `# syntax=` line: the BuildKit built into dockerd is used,
# so no frontend image is pulled from a registry.

ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------
# base: the OS and the Python interpreter, shared by the builder and the final image.
FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# DL3008: apt packages are not pinned on purpose: the base image fixes the Debian
# release, and pinning point versions would make the build fail at every security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------
# wheels: local wheels from the build context's .docker-wheels/ (gitignored; empty for a
# normal build). Only bind-mounted while pip runs, so no layer of the image holds them.
# pyproject.toml is copied only so that the COPY never matches nothing.
FROM scratch AS wheels
COPY pyproject.toml .docker-wheel[s] /wheels/

# ---------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/qsmprep with torch, qsmprep and its dependencies,
# the weights checked and TemplateFlow prefetched.
FROM base AS builder
# DL3008: unpinned apt packages, as in the base stage (the base image fixes the release).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/qsmprep
ENV PATH=/opt/qsmprep/bin:$PATH
COPY bids_app_bootstrap/pip_install.sh /opt/qsmprep-bootstrap/
# torch first and pinned, so that qsmprep's `torch>=2.1` does not pull another build.
# CPU by default: the CPU wheels of download.pytorch.org (a local wheel in
# .docker-wheels/ wins when it matches TORCH_SPEC).
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=pip_cert \
    --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    /opt/qsmprep-bootstrap/pip_install.sh \
      ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml README.md LICENSE /src/
COPY qsmprep/ /src/qsmprep/
RUN --mount=type=secret,id=pip_cert \
    --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    /opt/qsmprep-bootstrap/pip_install.sh /src
# Build-time checks: weights against their sha256 manifest; TemplateFlow skeleton and
# the templates of bids_app_bootstrap/templates.txt into /opt/templateflow, then found
# there the way qsmprep looks for them at run time (on disk only): the MNI152NLin2009cAsym
# images and the MASSP20 atlas of --regions-atlas.
# PREFETCH_TEMPLATES=0 (make test-container on a machine that cannot reach TemplateFlow)
# keeps only the skeleton: such an image has the embedded QSMChallenge atlas, no
# MNI152NLin2009cAsym space and no MASSP20.
ARG PREFETCH_TEMPLATES=1
ENV TEMPLATEFLOW_HOME=/opt/templateflow
COPY bids_app_bootstrap/ /opt/qsmprep-bootstrap/
RUN python /opt/qsmprep-bootstrap/verify_weights.py \
 && if [ "$PREFETCH_TEMPLATES" = 1 ]; then \
      python /opt/qsmprep-bootstrap/prefetch_templates.py \
      && python -c "from qsmprep.regions.templates import find_template as t; \
from qsmprep.regions.atlases import find_atlas as a; \
print(t('MNI152NLin2009cAsym'), t('MNI152NLin2009cAsym', ('T1w',)), a('MASSP20'))"; \
    else python /opt/qsmprep-bootstrap/prefetch_templates.py /dev/null; fi

# ---------------------------------------------------------------------------------------
# test: the builder plus the test dependencies and the test suite (CI runs
# `docker build --target test` and pytest inside it; never pushed).
FROM builder AS test
RUN --mount=type=secret,id=pip_cert \
    --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    /opt/qsmprep-bootstrap/pip_install.sh "/src[test]"
COPY tests/ /src/tests/
COPY benchmarks/ /src/benchmarks/
COPY docs/ /src/docs/
COPY bids_app_bootstrap/ /src/bids_app_bootstrap/
COPY .circleci/ /src/.circleci/
COPY Dockerfile Singularity.def Makefile .dockerignore .gitignore /src/
WORKDIR /src
ENV NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["python", "-m", "pytest"]

# ---------------------------------------------------------------------------------------
# runtime (the default target): the venv and templates on the bare base, a non-root user.
FROM base AS runtime
ARG VERSION=0+unknown
ARG VCS_REF=unknown
ARG SOURCE=https://github.com/qsmprep/qsmprep
LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="BIDS App: quantitative susceptibility mapping from multi-echo GRE MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.url="${SOURCE}" \
      org.opencontainers.image.documentation="${SOURCE}/blob/main/docs/containers.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="The qsmprep developers"
COPY --from=builder /opt/qsmprep /opt/qsmprep
COPY --from=builder /opt/templateflow /opt/templateflow
COPY bids_app_bootstrap/entrypoint.py /usr/local/bin/qsmprep
COPY bids_app_bootstrap/make_demo_data.sh /usr/local/bin/qsmprep-demo-data
# /work: default working directory, writable by any user id (docker run --user).
RUN useradd --create-home --uid 1000 --user-group --shell /bin/sh qsmprep \
 && mkdir -p /work && chmod 1777 /work \
 && chmod -R a-w /opt/templateflow
# /usr/local/bin (the entrypoint wrapper) before the venv's bin (the real qsmprep).
ENV PATH=/usr/local/bin:/opt/qsmprep/bin:$PATH \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib
# numeric, so that Kubernetes' runAsNonRoot and `docker run --user` checks can resolve it
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["qsmprep"]
