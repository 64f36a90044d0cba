#!/bin/sh
# pip install inside `docker build` (Dockerfile, builder stage): PIP_* settings that exist
# only while this RUN step runs, never in an image layer.
#  - /run/secrets/pip_cert (BuildKit secret `--secret id=pip_cert,src=FILE`): the CA bundle
#    pip must trust to reach its index from the build machine (e.g. behind a TLS proxy);
#  - /wheels (bind-mounted from the `wheels` stage, i.e. the build context's .docker-wheels/):
#    local wheels, e.g. the CPU build of torch, preferred to downloads, and an optional
#    constraints.txt pinning the versions of the dependencies;
set -eu
if [ -s /run/secrets/pip_cert ]; then
    export PIP_CERT=/run/secrets/pip_cert
fi
if [ -n "$(ls /wheels/*.whl 2>/dev/null)" ]; then
    export PIP_FIND_LINKS=/wheels
fi
if [ -s /wheels/constraints.txt ]; then  # pinned versions, e.g. those of a reference install
    export PIP_CONSTRAINT=/wheels/constraints.txt
fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120
exec /opt/qsmprep/bin/python -m pip install --no-cache-dir "$@"
