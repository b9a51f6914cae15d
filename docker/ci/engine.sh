#!/usr/bin/env bash
# Make a Docker Engine run on this (Debian) machine for tests/test_docker.py, as .ci/run starts
# PostgreSQL: Debian's docker.io engine, Compose v2 and BuildKit's buildx (Debian 13's docker-compose and
# docker-buildx packages: bookworm has only the old Python Compose 1.29 and no buildx; both are static Go
# programs that need nothing newer than bookworm's libc), and debootstrap for the local base image.
# Idempotent: what is installed and running is left as it is.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq docker.io debootstrap >/dev/null
fi

from_trixie() {  # package: install the current Debian 13 build, found through trixie's package index
  local package=$1 file
  file=$(curl -fsSL "$mirror/dists/trixie/main/binary-amd64/Packages.xz" | xz -d \
    | awk -v p="$package" '$1 == "Package:" {hit = ($2 == p)} hit && $1 == "Filename:" {print $2; exit}')
  curl -fsSL -o "/tmp/$package.deb" "$mirror/$file"
  dpkg -i "/tmp/$package.deb" >/dev/null
  rm -f "/tmp/$package.deb"
}
docker compose version >/dev/null 2>&1 || from_trixie docker-compose
docker buildx version >/dev/null 2>&1 || from_trixie docker-buildx

if ! docker info >/dev/null 2>&1; then
  (dockerd >/var/log/dockerd.log 2>&1 &)
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/dockerd.log >&2; exit 1; }
fi

# A Docker host that runs CI again and again keeps every earlier build: images left untagged by newer
# builds and BuildKit's layer cache (22 GB after a day of runs here, which once left the venv install
# below no room: "No space left on device"). Drop the untagged images and cap the cache.
docker image prune -f >/dev/null
docker builder prune -f --keep-storage "${RTPRUNE_CI_BUILD_CACHE:-8GB}" >/dev/null
df -h / | awk 'NR == 2 {print "disk: " $4 " free of " $2}'

# The CPU image takes torch's CPU wheel from docker/wheels when this machine has one on disk (it reaches
# PyPI, not PyTorch's own CPU index); tests/test_docker.py then builds with LOCAL_WHEELS=1.
here=$(cd "$(dirname "$0")" && pwd)
torch=$(sed -n 's/^ARG TORCH_VERSION=//p' "$here/../../Dockerfile")
for wheel in "${PIP_FIND_LINKS:-/opt/wheels}"/torch-"$torch"+cpu-cp311-*.whl; do
  if [ -f "$wheel" ]; then cp -n "$wheel" "$here/../wheels/"; fi
done
docker version --format 'Docker Engine {{.Server.Version}}'
