# Shared by the broker scripts (kafka-, pubsub-, redis-start.sh and -stop.sh), sourced,
# never run: the checks on a port and on a broker's PID file that each of them makes,
# and the one way they stop a broker (exactly the PID its start script recorded, TERM
# first, KILL if it does not exit in time; never by name).
#
# The functions return a status and leave exiting to the caller (which runs with
# `set -euo pipefail`); messages go to stderr.

# port_open HOST PORT: succeeds when something accepts a TCP connection on HOST:PORT
# (bash's /dev/tcp).
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# running_pid PID_FILE: prints the PID that PID_FILE holds and succeeds while that
# process runs; otherwise removes a stale PID_FILE (if there is one) and fails.
running_pid() {
    local pid_file=$1 pid
    [[ -f "$pid_file" ]] || return 1
    pid="$(cat "$pid_file")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
        return 0
    fi
    rm -f "$pid_file"
    return 1
}

# stop_pid_file TAG PID_FILE WHAT STOP_SECONDS [CMDLINE_PATTERN]
#
# Stops the process whose PID PID_FILE holds: TERM, then KILL if it still runs after
# STOP_SECONDS. With CMDLINE_PATTERN, a live PID whose command line does not contain it
# is left alone (a stale PID file may name a PID the system has since given to another
# process). Every message starts with "TAG: " and calls the process WHAT. Removes
# PID_FILE. Fails (status 1) only when PID_FILE holds no PID; no PID_FILE is success:
# nothing to stop.
stop_pid_file() {
    local tag=$1 pid_file=$2 what=$3 stop_seconds=$4 cmdline_pattern=${5:-}
    local pid cmdline
    if [[ ! -f "$pid_file" ]]; then
        echo "$tag: no pid file ($pid_file); nothing to stop" >&2
        return 0
    fi
    pid="$(cat "$pid_file")"
    if ! [[ "$pid" =~ ^[0-9]+$ ]]; then
        rm -f "$pid_file"
        echo "$tag: pid file held '$pid', not a PID; removed it" >&2
        return 1
    fi

    if [[ -n "$cmdline_pattern" ]]; then
        cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" || true)"
        if kill -0 "$pid" 2>/dev/null && [[ -n "$cmdline" && "$cmdline" != *"$cmdline_pattern"* ]]; then
            echo "$tag: PID $pid is no longer $what; not signalling it" >&2
            rm -f "$pid_file"
            return 0
        fi
    fi

    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 $((stop_seconds * 10))); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$tag: PID $pid ignored TERM for $stop_seconds s; sending KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "$tag: stopped $what (PID $pid)" >&2
    else
        echo "$tag: PID $pid was not running" >&2
    fi
    rm -f "$pid_file"
}

# wait_until_ready TAG WHAT PID PID_FILE LOG_FILE TIMEOUT_SECONDS POLL_SECONDS CHECK [ARG...]
#
# Runs CHECK [ARG...] every POLL_SECONDS until it succeeds: the broker just started as
# PID (recorded in PID_FILE, logging to LOG_FILE) is ready. Fails if PID exits first, or
# if TIMEOUT_SECONDS pass first (then it stops PID with stop_pid_file); either way it
# says so, prints the last lines of LOG_FILE and removes PID_FILE.
wait_until_ready() {
    local tag=$1 what=$2 pid=$3 pid_file=$4 log_file=$5 timeout_seconds=$6 poll_seconds=$7
    shift 7
    local deadline=$((SECONDS + timeout_seconds))
    until "$@"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pid_file"
            echo "$tag: $what exited during start-up; last lines of $log_file:" >&2
            tail -n 20 "$log_file" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "$tag: $what was not ready within ${timeout_seconds}s; stopping it; last lines of $log_file:" >&2
            tail -n 20 "$log_file" >&2 || true
            stop_pid_file "$tag" "$pid_file" "$what" 10 || true
            return 1
        fi
        sleep "$poll_seconds"
    done
}
