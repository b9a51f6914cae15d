#!/usr/bin/env bash
# Build the local stand-ins for the images this network cannot pull (see compose.ci.yml), each from
# Debian's packages on the debootstrapped base (base.sh). Each image is tagged with a hash of the files
# it is built from, so it is built once per Docker host and rebuilt only when they change. Prints the
# variables compose.ci.yml reads, for `eval "$(docker/ci/images.sh)"`. Never pushes anything.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
base=$(bash "$here/base.sh")

drop_superseded() {  # tag: remove the other tags of its repository (builds of files since changed), which
  # would otherwise pile up a few GB per change on a Docker host that runs CI again and again
  local tag=$1 old
  for old in $(docker images "${tag%:*}" --format '{{.Repository}}:{{.Tag}}'); do
    if [ "$old" != "$tag" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
  done
}

stand_in() {  # name, files it is built from...
  local name=$1
  shift
  local tag
  tag="rtprune-ci/$name:$(cat "$@" <(echo "$base") | sha256sum | cut -c1-12)"
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    docker build --quiet --build-arg BASE_IMAGE="$base" -f "$here/$name.Dockerfile" -t "$tag" "$here/.." >&2 || exit 1
  fi
  drop_superseded "$tag"
  echo "$tag"
}

# (each in an assignment of its own, so that a failed build stops the script: set -e ignores a failure
# inside an echo's command substitution)
postgres=$(stand_in postgres "$here/postgres.Dockerfile" "$here/postgres-entrypoint.sh")
prometheus=$(stand_in prometheus "$here/prometheus.Dockerfile")
vllm=$(stand_in vllm "$here/vllm.Dockerfile" "$here/../vllm/cpu-venv.sh")
echo "export RTPRUNE_CI_BASE_IMAGE=$base"
echo "export RTPRUNE_CI_POSTGRES_IMAGE=$postgres"
echo "export RTPRUNE_CI_PROMETHEUS_IMAGE=$prometheus"
echo "export RTPRUNE_CI_VLLM_IMAGE=$vllm"
