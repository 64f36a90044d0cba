#!/usr/bin/env bash
# Apptainer check (part of docs/containers.md, run by hand after `make test-container`):
# Debian bookworm has no apptainer package, so Debian sid's runs in a sid container with
# the capabilities it needs. In it: build the .sif from the Docker image's archive, once
# with `apptainer build x.sif docker-archive://...` and once from Singularity.def, then run
# the demo with the .sif (`apptainer run --no-privs --cleanenv`) and compare its Chimap
# with the host run of `make test-container` (compare_runs.py).
# Environment: IMAGE (default qsmprep:test), OUT (default .container-test), BIN (host
# venv bin/), SID_IMAGE (an image with Debian sid; default: debootstrapped here).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
# shellcheck source=docker_env.sh
. "$REPO/bids_app_bootstrap/host/docker_env.sh"
BIN=${BIN:-$REPO/.venv/bin}
IMAGE=${IMAGE:-qsmprep:test}
OUT=${OUT:-$REPO/.container-test}
SID_IMAGE=${SID_IMAGE:-qsmprep-apptainer-base:sid}
NPROCS=${NPROCS:-2}
ensure_docker
[ -d "$OUT/host/out" ] || { log "run make test-container first (host run in $OUT/host)"; exit 1; }

if ! docker image inspect "$SID_IMAGE" >/dev/null 2>&1; then
    log "debootstrapping Debian sid (minbase) as $SID_IMAGE"
    root=$(mktemp -d /var/tmp/qsmprep-sid.XXXXXX)
    nice -n 10 debootstrap --variant=minbase sid "$root" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    tar -C "$root" -c . | docker import - "$SID_IMAGE" >/dev/null
    rm -rf "$root"
fi
if ! docker image inspect qsmprep-apptainer:sid >/dev/null 2>&1; then
    log "installing Debian sid's apptainer into qsmprep-apptainer:sid"
    docker rm -f qsmprep-apptainer-setup >/dev/null 2>&1 || true
    docker run --name qsmprep-apptainer-setup "$SID_IMAGE" sh -c \
        'apt-get -o Acquire::Check-Valid-Until=false update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends apptainer squashfs-tools ca-certificates >/dev/null \
         && apptainer --version'
    docker commit qsmprep-apptainer-setup qsmprep-apptainer:sid >/dev/null
    docker rm qsmprep-apptainer-setup >/dev/null
fi

if [ "${REUSE_SIF:-0}" = 1 ] && [ -s "$OUT/qsmprep.sif" ] && [ -s "$OUT/qsmprep-docker.tar" ]; then
    log "reusing $OUT/qsmprep.sif and $OUT/qsmprep-docker.tar (REUSE_SIF=1)"
    build_archive=": reusing qsmprep.sif"
else
    log "saving $IMAGE to $OUT/qsmprep-docker.tar"
    docker save "$IMAGE" -o "$OUT/qsmprep-docker.tar"
    build_archive="apptainer build --force qsmprep.sif docker-archive:///t/qsmprep-docker.tar"
fi
rm -rf "$OUT/apptainer" && mkdir -p "$OUT/apptainer/out" "$OUT/apptainer/work"
cp Singularity.def "$OUT/Singularity.def"
loops=()
for dev in /dev/loop-control /dev/loop[0-9]*; do [ -e "$dev" ] && loops+=(--device "$dev"); done
log "apptainer in a sid container: build from docker-archive and from Singularity.def, run"
start=$(date +%s)
nice -n 10 docker run --rm --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --security-opt systempaths=unconfined --device /dev/fuse "${loops[@]}" \
    -v "$OUT:/t" -w /t qsmprep-apptainer:sid bash -euxc "
      apptainer --version
      $build_archive
      # --notest: the %test section run by build needs capabilities this container lacks
      # ('Requesting capability set ... while permitted ...'); run it with --no-privs
      apptainer build --notest --force qsmprep-def.sif Singularity.def
      apptainer inspect --runscript qsmprep-def.sif
      apptainer test --no-privs qsmprep-def.sif
      apptainer exec --no-privs qsmprep.sif qsmprep --version
      apptainer run --no-privs --cleanenv -B /t/bids:/data:ro -B /t/apptainer/out:/out \
        -B /t/apptainer/work:/work qsmprep-def.sif /data /out participant -w /work \
        --nprocs $NPROCS
      ls -la qsmprep.sif qsmprep-def.sif
    " >"$OUT/apptainer.log" 2>&1 || { tail -40 "$OUT/apptainer.log"; exit 1; }
log "apptainer build + run took $(( $(date +%s) - start )) s; sif: $(du -h "$OUT/qsmprep.sif" | cut -f1)"
( cd "$OUT/bids" && sha256sum --quiet -c "$OUT/bids.sha256" ) \
    || { log "FAIL: the input dataset changed"; exit 1; }
"$BIN/python" bids_app_bootstrap/host/compare_runs.py "$OUT/host/out" "$OUT/apptainer/out" \
    | tee "$OUT/compare-apptainer.txt"
log "PASSED"
