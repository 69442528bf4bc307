#!/usr/bin/env bash
# Install a local Slurm (controller + node daemon + client) and munge for the
# Slurm tests (tests/test_slurm.py). Debian 12, run as root. Idempotent: exits at
# once when the binaries are already there.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge)

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    echo "install_slurm: already installed ($(slurmctld -V 2>/dev/null || true))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PKGS[@]}"
echo "install_slurm: installed $(slurmctld -V)"
