# Shared by the hpcckpt Slurm hooks; sourced, not run.
#
# Slurm gives hooks a fresh environment (no PATH of its own), so the admin says
# where hpcckpt lives, where the store is and where to log in one env file:
# $HPCCKPT_ENV_FILE, by default /etc/hpcckpt/hpcckpt.env. Lines are NAME=value.
#
# A hook's exit status matters to Slurm: a failing Prolog or Epilog DRAINS the
# node. hpcckpt decides on draining itself (policy slurm.drain_on_failed_check),
# so these scripts always exit 0, even when hpcckpt is missing or crashes; they
# say why in the hook log and in syslog.

HPCCKPT_ENV_FILE=${HPCCKPT_ENV_FILE:-/etc/hpcckpt/hpcckpt.env}
if [ -r "$HPCCKPT_ENV_FILE" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$HPCCKPT_ENV_FILE"
    set +a
fi
PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}
export PATH
HPCCKPT_BIN=${HPCCKPT_BIN:-hpcckpt}
HPCCKPT_HOOK_LOG=${HPCCKPT_HOOK_LOG:-/var/log/hpcckpt/hooks.log}
HPCCKPT_LOG_FORMAT=${HPCCKPT_LOG_FORMAT:-json}
export HPCCKPT_LOG_FORMAT

hpcckpt_hook() {
    # $1: the hook name given to `hpcckpt slurm`
    logdir=$(dirname "$HPCCKPT_HOOK_LOG")
    [ -d "$logdir" ] || mkdir -p -m 0750 "$logdir" 2>/dev/null
    if ! command -v "$HPCCKPT_BIN" >/dev/null 2>&1; then
        msg="hpcckpt $1: $HPCCKPT_BIN not found (set HPCCKPT_BIN in $HPCCKPT_ENV_FILE); job ${SLURM_JOB_ID:-?} not handled"
        echo "$msg" >>"$HPCCKPT_HOOK_LOG" 2>/dev/null
        logger -t hpcckpt -p daemon.err "$msg" 2>/dev/null
        exit 0
    fi
    "$HPCCKPT_BIN" slurm "$1" >>"$HPCCKPT_HOOK_LOG" 2>&1 </dev/null
    rc=$?
    if [ "$rc" -ne 0 ]; then
        msg="hpcckpt slurm $1 exited $rc for job ${SLURM_JOB_ID:-?}; see $HPCCKPT_HOOK_LOG"
        logger -t hpcckpt -p daemon.err "$msg" 2>/dev/null
    fi
    exit 0
}
