#!/usr/bin/env bash
# Install the Debian packages a local SLURM cluster needs (slurm/cluster.sh, one or N nodes).
#
#   slurm/install_deps.sh            # slurm-wlm + munge + slurmdbd + mariadb-server
#   PREFVEC_SLURM_ACCOUNTING=0 slurm/install_deps.sh   # skip slurmdbd + mariadb (no sacct)
#   PREFVEC_SLURM_MPI=1 slurm/install_deps.sh          # also Open MPI + PMIx (srun --mpi=pmix)
#
# Idempotent: does nothing when every binary is already there. Runs `apt-get update` once,
# only when something is missing. Needs root (or sudo) and a Debian/Ubuntu apt.
set -euo pipefail

accounting="${PREFVEC_SLURM_ACCOUNTING:-1}"
# binary -> package; the binary is what we check, the package is what apt installs.
# ip, nsenter, unshare: the namespaces of `cluster.sh up --nodes N` (tests/slurm starts a
# two-node cluster too); a minimal Debian image lacks iproute2.
declare -A wanted=([sbatch]=slurm-wlm [slurmctld]=slurm-wlm [slurmd]=slurm-wlm
                   [munged]=munge [mungekey]=munge [ip]=iproute2 [nsenter]=util-linux
                   [unshare]=util-linux)
if [[ "$accounting" == 1 ]]; then
    wanted[slurmdbd]=slurmdbd
    wanted[mariadbd]=mariadb-server
    wanted[mariadb-install-db]=mariadb-server
fi

if [[ "${PREFVEC_SLURM_MPI:-0}" == 1 ]]; then
    wanted[mpirun]=openmpi-bin
    # The pmix plugin of slurmd dlopens the unversioned libpmix.so, which only the -dev has.
    [[ -e /usr/lib/x86_64-linux-gnu/libpmix.so || -e /usr/lib/aarch64-linux-gnu/libpmix.so ]] \
        || wanted[libpmix.so]=libpmix-dev
fi

missing=()
for bin in "${!wanted[@]}"; do
    # The daemons live in /usr/sbin, which a non-login PATH may not contain.
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1; then
        missing+=("${wanted[$bin]}")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_deps: slurm packages already installed"
    exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

sudo_cmd=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_deps: need root or sudo to install: ${packages[*]}" >&2; exit 1; }
    sudo_cmd=(sudo -n)
fi
command -v apt-get >/dev/null 2>&1 || { echo "install_deps: apt-get not found; install by hand: ${packages[*]}" >&2; exit 1; }

echo "install_deps: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
# policy-rc.d on containers refuses to start the packaged services, which is what we want:
# cluster.sh runs its own daemons in a private folder on private ports.
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "install_deps: done"
