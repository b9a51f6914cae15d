#!/usr/bin/env bash
# A local stand-in for the official `python:3.11-slim-bookworm` base image, made from Debian's own
# packages with debootstrap, for machines that reach Debian's archive and PyPI but no image registry
# (CI here). Python 3.11 is bookworm's; a venv at /usr/local gives `python` and `pip` on PATH with
# installs allowed, as in the official image. The host's extra CA certificates are trusted too, so
# that pip inside `docker build` passes the same TLS-inspecting egress proxy the host passes.
# Cached: an image tagged with this script's hash is built once per Docker host. Never pushed.
#   usage: docker/ci/base.sh            (prints the image's name)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tag="rtprune-ci/python:3.11-bookworm-$(cat "$0" | sha256sum | cut -c1-12)"
# earlier builds of this script, superseded by this one (a few hundred MB each)
for old in $(docker images rtprune-ci/python --format '{{.Repository}}:{{.Tag}}'); do
  if [ "$old" != "$tag" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
done
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >&2
cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$rootfs" update-ca-certificates >&2
chroot "$rootfs" python3 -m venv /usr/local
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$tag" >&2
echo "$tag"
