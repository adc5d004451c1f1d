#!/bin/bash
# The system test's checks, run as root inside the Debian 12 guest from the
# payload disk (which also holds the .deb, load.py and checks.env). Each check
# is a function; `check GROUP FUNCTION` runs it and reports one line to
# the host: PASS/FAIL NAME SECONDS [detail]. Groups: base (package and
# sockets, no daemon needed), daemon (runs, limits, operation), collusion
# (two runs at once, tests/system/collusion.py), purge.
set -u
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
# shellcheck source=/dev/null
. ./checks.env
RESULTS=${SANDBOXD_RESULTS:-/dev/stdout}
JOURNAL=${SANDBOXD_JOURNAL:-/dev/null}
PAYLOAD=$PWD
SOCK=/run/sandboxd/sandboxd.sock
API_KEY=dify-sandbox
WORK=$(mktemp -d)
failures=0
daemon_down=

report() { echo "$*" >"$RESULTS"; }

check() {
    local group=$1 name=$2 start out status took
    if [ -n "${SANDBOXD_ONLY:-}" ] && [[ ",$SANDBOXD_ONLY," != *",$group,"* ]]; then
        report "SKIP $name (group $group not selected)"
        return
    fi
    if [ "$group" = daemon ] && [ -n "$daemon_down" ]; then
        failures=$((failures + 1))
        report "FAIL $name 0.0s: not run: the daemon did not start (first_request_starts_the_service)"
        return
    fi
    start=$(date +%s%N)
    out=$($name 2>&1 | tr '\r' '\n'; exit "${PIPESTATUS[0]}")
    status=$?
    took=$(( ($(date +%s%N) - start) / 100000000 ))
    took="$((took / 10)).$((took % 10))s"
    if [ $status -eq 0 ]; then
        report "PASS $name $took${out:+ $(echo "$out" | tail -1 | tr -d '\r')}"
    else
        failures=$((failures + 1))
        report "FAIL $name $took: $(echo "$out" | tail -8 | tr '\n' '|')"
        # Every later daemon check would only wait out its timeouts.
        [ "$name" = first_request_starts_the_service ] && daemon_down=1
    fi
}

# expect WHAT ACTUAL EXPECTED
expect() {
    if [ "$2" != "$3" ]; then
        echo "$1: got '$2', want '$3'"
        return 1
    fi
}

# Every client call is bounded: a daemon that never answers fails the check
# instead of hanging the test.
sandboxd() { timeout 180 /usr/bin/sandboxd "$@"; }
# A run over the native socket; prints the result JSON. Its exit status is the
# code's (non-zero for a bomb), so it is not checked: `field` fails loudly when
# the output is not a result.
run_json() { sandboxd run --json --language "$1" -c "$2" || true; }
# field JSON KEY: one top-level field of a JSON object, as Python's str().
field() { python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))' "$1" "$2" || echo "not a JSON result: $1"; }

# --- base: the package ------------------------------------------------------------

install_package() {
    apt install -y -q "$PAYLOAD"/sandboxd_*.deb >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; return 1; }
}

units_are_valid() {
    systemd-analyze verify sandboxd.socket sandboxd-http.socket sandboxd.service sandboxd.slice
}

sockets_are_active() {
    expect sandboxd.socket "$(systemctl is-active sandboxd.socket)" active || return 1
    expect sandboxd-http.socket "$(systemctl is-active sandboxd-http.socket)" active || return 1
    expect "socket enabled" "$(systemctl is-enabled sandboxd.socket)" enabled
}

service_waits_for_first_request() {
    expect sandboxd.service "$(systemctl is-active sandboxd.service)" inactive
}

native_socket_is_root_and_group_only() {
    expect "mode owner group" "$(stat -c '%a %U %G' "$SOCK")" "660 root sandboxd"
}

http_listens_on_loopback_only() {
    # 127.0.0.1:8194 in /proc/net/tcp is 0100007F:2002, state 0A is LISTEN.
    grep -q ' 0100007F:2002 00000000:0000 0A ' /proc/net/tcp || { cat /proc/net/tcp; return 1; }
    ! grep -q ':2002 00000000:0000 0A ' <(grep -v ' 0100007F:2002 ' /proc/net/tcp)
}

config_is_a_conffile() {
    dpkg-query -W -f='${Conffiles}\n' sandboxd | grep -q ' /etc/sandboxd/sandboxd.toml ' ||
        { echo "not a conffile"; return 1; }
    grep -Eq '^cgroups *= *"systemd"' /etc/sandboxd/sandboxd.toml ||
        { echo 'packaged config does not set cgroups = "systemd"'; return 1; }
}

security_exposure() {
    # Informational: systemd's own rating of the hardening (lower is better).
    systemd-analyze security --no-pager sandboxd.service | tail -1
}

# --- daemon: runs, limits, operation ----------------------------------------------

first_request_starts_the_service() {
    local out
    out=$(sandboxd run -c 'print(1)') || return 1
    expect "stdout" "$out" 1 || return 1
    expect sandboxd.service "$(systemctl is-active sandboxd.service)" active
}

daemon_can_read_kernel_log() {
    # The hardening must leave /dev/kmsg readable (blocked_syscall names the call).
    ! journalctl -u sandboxd.service --no-pager -o cat | grep 'cannot follow /dev/kmsg'
}

python_over_unix_socket() {
    local out
    out=$(run_json python3 'import sys; print(6 * 7, sys.version_info[:2])') || return 1
    expect status "$(field "$out" status)" ok || return 1
    expect stdout "$(field "$out" stdout)" "42 (3, 11)"
}

nodejs_over_unix_socket() {
    local out
    out=$(run_json nodejs 'console.log(6 * 7)') || return 1
    expect status "$(field "$out" status)" ok || return 1
    expect stdout "$(field "$out" stdout)" 42
}

# dify_run LANGUAGE CODE [NETWORK]: POST /v1/sandbox/run (enable_network when NETWORK
# is "true"), prints data.stdout (fails on an error).
dify_run() {
    local body
    body=$(python3 -c 'import json, sys; print(json.dumps({"language": sys.argv[1], "code": sys.argv[2], "preload": "", "enable_network": sys.argv[3] == "true"}))' "$1" "$2" "${3:-false}")
    curl -sS --max-time 180 --fail-with-body -H "X-Api-Key: $API_KEY" -H 'Content-Type: application/json' \
        --data-binary "$body" http://127.0.0.1:8194/v1/sandbox/run |
        python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["code"] == 0 and not r["data"]["error"], r; print(r["data"]["stdout"], end="")'
}

python_over_http() {
    expect stdout "$(dify_run python3 'print(6 * 7)')" 42
}

nodejs_over_http() {
    expect stdout "$(dify_run nodejs 'console.log(6 * 7)')" 42
}

http_requires_the_api_key() {
    expect "status without key" "$(curl -s --max-time 180 -o /dev/null -w '%{http_code}' \
        --data-binary '{"language":"python3","code":"print(1)"}' http://127.0.0.1:8194/v1/sandbox/run)" 401
}

memory_bomb_gets_memory_verdict() {
    local out
    out=$(run_json python3 $'chunks = []\nwhile True:\n    chunks.append(b"x" * (16 << 20))') || return 1
    expect status "$(field "$out" status)" memory || return 1
    expect "service after OOM kill" "$(systemctl is-active sandboxd.service)" active || return 1
    expect "next run" "$(sandboxd run -c 'print(2)')" 2
}

fork_bomb_gets_tasks_verdict() {
    local out
    out=$(run_json python3 $'import os\nwhile True:\n    os.fork()') || return 1
    expect status "$(field "$out" status)" tasks || return 1
    expect "service after fork bomb" "$(systemctl is-active sandboxd.service)" active || return 1
    expect "next run" "$(sandboxd run -c 'print(3)')" 3
}

non_member_is_refused_member_is_served() {
    id outsider >/dev/null 2>&1 || useradd --no-create-home outsider
    id insider >/dev/null 2>&1 || useradd --no-create-home --groups sandboxd insider
    if timeout 180 runuser -u outsider -- sandboxd run -c 'print(1)' >"$WORK/outsider" 2>&1; then
        echo "outsider was served: $(cat "$WORK/outsider")"
        return 1
    fi
    runuser -u outsider -- python3 -c "import socket; socket.socket(socket.AF_UNIX).connect('$SOCK')" \
        2>&1 | grep -q PermissionError || { echo "outsider's connect was not EACCES"; return 1; }
    expect "insider" "$(timeout 180 runuser -u insider -- sandboxd run -c 'print(5)')" 5
}

# with_load ACTION...: run ACTION while load.py keeps requests coming; print its counts.
with_load() {
    local stop=$WORK/stop progress=$WORK/progress before
    rm -f "$stop" "$progress"
    python3 "$PAYLOAD/load.py" "$SOCK" "$stop" "$progress" >"$WORK/load" &
    local pid=$!
    wait_progress "$progress" 3 || { touch "$stop"; wait $pid; return 1; }
    "$@" >&2 || { touch "$stop"; wait $pid; return 1; }
    before=$(cat "$progress")
    wait_progress "$progress" $((before + 5)) || { touch "$stop"; wait $pid; return 1; }
    touch "$stop"
    wait $pid
    cat "$WORK/load"
}

# wait_progress FILE N: until load.py has finished N requests (up to 120 s).
wait_progress() {
    local i
    for i in $(seq 240); do
        [ "$(cat "$1" 2>/dev/null || echo 0)" -ge "$2" ] && return 0
        sleep 0.5
    done
    echo "load stalled at $(cat "$1" 2>/dev/null) requests"
    return 1
}

main_pid() { systemctl show -P MainPID sandboxd.service; }

# wait_active: a reload is asynchronous on systemd 252 (Type=notify): `systemctl
# reload` returns once SIGHUP is sent; the unit is "reloading" until READY=1.
wait_active() {
    local i
    for i in $(seq 240); do
        [ "$(systemctl is-active sandboxd.service)" = active ] && return 0
        sleep 0.5
    done
    echo "sandboxd.service still $(systemctl is-active sandboxd.service) after 120 s"
    return 1
}

# The reload is done when the unit is active again and the new config is in
# force: 3 warm python3 workers instead of the default two per core.
reload_with_new_pool_size() {
    sed -i '/^\[python3\]/,/^\[/ s/^#\? *pool_size = .*/pool_size = 3/' /etc/sandboxd/sandboxd.toml
    systemctl reload sandboxd.service || return 1
    wait_active || return 1
    local i
    for i in $(seq 120); do
        [[ "$(systemctl show -P StatusText sandboxd.service)" == *"python3 "*"/3"* ]] && return 0
        sleep 0.5
    done
    echo "status after reload: $(systemctl show -P StatusText sandboxd.service)"
    return 1
}

reload_keeps_serving() {
    local pid counts
    pid=$(main_pid)
    counts=$(with_load reload_with_new_pool_size) || { echo "$counts"; return 1; }
    expect "load during reload" "$(field "$counts" error) $(field "$counts" refused) $(field "$counts" silent)" "0 0 0" || { echo "$counts"; return 1; }
    expect "main pid after reload" "$(main_pid)" "$pid" || return 1
    echo "$counts, $(systemctl show -P StatusText sandboxd.service)"
}

restart_refuses_no_one() {
    local pid counts
    pid=$(main_pid)
    counts=$(with_load systemctl restart sandboxd.service) || return 1
    # Runs in flight at the restart may get an error answer; none may be
    # refused or left without an answer.
    expect "refused and silent during restart" "$(field "$counts" refused) $(field "$counts" silent)" "0 0" || { echo "$counts"; return 1; }
    [ "$(main_pid)" != "$pid" ] || { echo "main pid unchanged: not restarted"; return 1; }
    echo "$counts"
}

stop_finishes_in_flight_runs() {
    run_json python3 $'import time\ntime.sleep(3)\nprint("finished")' >"$WORK/inflight" &
    local pid=$!
    # Stop once the run is executing (a worker is busy).
    sleep 1
    systemctl stop sandboxd.service || return 1
    wait $pid || { echo "in-flight run: $(cat "$WORK/inflight")"; return 1; }
    expect "in-flight run" "$(field "$(cat "$WORK/inflight")" stdout)" finished || return 1
    expect "service result" "$(systemctl show -P Result sandboxd.service)" success || return 1
    expect "exit status" "$(systemctl show -P ExecMainStatus sandboxd.service)" 0 || return 1
    expect "socket after stop" "$(systemctl is-active sandboxd.socket)" active || return 1
    expect "run after stop (socket activation again)" "$(sandboxd run -c 'print(7)')" 7
}

# pool_scopes: the sandboxd-pool-*.scope units systemd has loaded, one a line.
pool_scopes() { systemctl list-units --all --plain --no-legend 'sandboxd-pool-*.scope' | cut -d' ' -f1; }

# After runs, a reload and a restart: the sockets, the service, the slice and the
# current daemon's pool scope (one per live generation); no scope of an old
# generation or an old daemon is left once its runs are done.
units_are_only_the_live_pool() {
    expect "next run" "$(sandboxd run -c 'print(8)')" 8 || return 1
    local pid units unexpected i
    pid=$(main_pid)
    for i in $(seq 60); do
        units=$(systemctl list-units --plain --no-legend 'sandboxd*' | cut -d' ' -f1 | sort)
        unexpected=$(echo "$units" | grep -v -x -e sandboxd.socket -e sandboxd-http.socket \
            -e sandboxd.service -e sandboxd.slice -e "sandboxd-pool-$pid-[0-9]*\.scope")
        [ -z "$unexpected" ] && break
        sleep 0.5
    done
    [ -z "$unexpected" ] || { echo "unexpected units after 30 s: $unexpected"; return 1; }
    echo "$units" | grep -q -x "sandboxd-pool-$pid-[0-9]*\.scope" || { echo "no pool scope of pid $pid: $units"; return 1; }
    echo $units
}

stop_leaves_no_pool_scope() {
    expect "run" "$(sandboxd run -c 'print(9)')" 9 || return 1
    [ -n "$(pool_scopes)" ] || { echo "no pool scope while the daemon runs"; return 1; }
    systemctl stop sandboxd.service || return 1
    local left
    left=$(pool_scopes)
    [ -z "$left" ] || { echo "left after stop: $left"; systemctl status --no-pager $left | head -20; return 1; }
}

# [network] mode = "allow" under the unit's hardening: the daemon builds its egress
# network (an nft table of its own, forwarding on) and serves a run asking for
# network. The guest has nowhere to reach: the run's own status is what counts.
# The packaged config is restored afterwards, and the daemon then leaves no table.
network_allow_mode_serves() {
    local config=/etc/sandboxd/sandboxd.toml status
    cp -a "$config" "$WORK/sandboxd.toml.orig"
    serve_with_network_allow "$config"
    status=$?
    [ $status -eq 0 ] || journalctl -u sandboxd.service --no-pager -o cat -n 5
    cp -a "$WORK/sandboxd.toml.orig" "$config"
    systemctl restart sandboxd.service || return 1
    expect "service with the packaged config" "$(systemctl is-active sandboxd.service)" active || return 1
    [ $status -eq 0 ] || return 1
    ! nft list tables | grep sandboxd || { echo "egress table left after mode allow ended"; return 1; }
}

# The guest's NIC is QEMU's user network (restrict=on: nothing leaves it) and
# nothing configures it; mode "allow" builds egress on the IPv4 default route.
ensure_default_route() {
    [ -n "$(ip -4 route show default)" ] && return 0
    local nic
    nic=$(ip -o link show | awk -F': ' '$2 != "lo" { print $2; exit }')
    ip link set "$nic" up && ip addr add 10.0.2.15/24 dev "$nic" && ip route add default via 10.0.2.2
}

serve_with_network_allow() {
    ensure_default_route || { echo "no default route"; return 1; }
    sed -i '/^\[network\]/,/^\[/ s/^#\? *mode = .*/mode = "allow"/' "$1"
    grep -A4 '^\[network\]' "$1" | grep -qx 'mode = "allow"' || { echo "config edit failed"; return 1; }
    systemctl restart sandboxd.service || return 1
    expect "service with mode allow" "$(systemctl is-active sandboxd.service)" active || return 1
    expect "run with enable_network" "$(dify_run python3 'print(10)' true)" 10 || return 1
    nft list tables | grep -q sandboxd || { echo "no sandboxd nft table: $(nft list tables)"; return 1; }
    expect "service after the run" "$(systemctl is-active sandboxd.service)" active
}

never_restarted_by_failure_or_watchdog() {
    expect "watchdog" "$(systemctl show -P WatchdogUSec sandboxd.service)" 30s || return 1
    expect "restarts" "$(systemctl show -P NRestarts sandboxd.service)" 0
}

# Two colluding runs at once, on this guest's kernel: a root fd walked to the host,
# locks and watches on the shared tree, /dev/shm, stdout held past the deadline
# (tests/system/collusion.py; the code is the integration tests').
runs_share_no_file_channel() {
    timeout 300 python3 "$PAYLOAD/collusion.py" "$SOCK"
}

# --- purge ------------------------------------------------------------------------

purge_leaves_nothing() {
    apt-get purge -y -q sandboxd >"$WORK/purge.log" 2>&1 || { tail -20 "$WORK/purge.log"; return 1; }
    local left=""
    systemctl list-unit-files 'sandboxd*' --no-legend | grep -q . && left+=" unit-files"
    systemctl list-units --all 'sandboxd*' --no-legend | grep -v -e ' not-found ' -e '^$' | grep -q . && left+=" units"
    getent group sandboxd >/dev/null && left+=" group"
    for path in /var/lib/sandboxd /etc/sandboxd /usr/lib/sandboxd /usr/bin/sandboxd /run/sandboxd; do
        [ -e "$path" ] && left+=" $path"
    done
    grep -q ':2002 00000000:0000 0A ' /proc/net/tcp && left+=" port-8194"
    [ -z "$left" ] || { systemctl list-units --all --no-legend 'sandboxd*'; echo "left behind:$left"; return 1; }
}

report "INFO guest up $(cut -d" " -f1 /proc/uptime)s at first check, $(uname -r), systemd $(systemctl --version | head -1 | cut -d' ' -f2), $(nproc) cpus"
check base install_package
check base units_are_valid
check base sockets_are_active
check base service_waits_for_first_request
check base native_socket_is_root_and_group_only
check base http_listens_on_loopback_only
check base config_is_a_conffile
check base security_exposure
check daemon first_request_starts_the_service
check daemon daemon_can_read_kernel_log
check daemon python_over_unix_socket
check daemon nodejs_over_unix_socket
check daemon python_over_http
check daemon nodejs_over_http
check daemon http_requires_the_api_key
check daemon memory_bomb_gets_memory_verdict
check daemon fork_bomb_gets_tasks_verdict
check daemon non_member_is_refused_member_is_served
check daemon reload_keeps_serving
check daemon restart_refuses_no_one
check daemon units_are_only_the_live_pool
check daemon stop_finishes_in_flight_runs
check daemon stop_leaves_no_pool_scope
check daemon network_allow_mode_serves
check daemon never_restarted_by_failure_or_watchdog
check collusion runs_share_no_file_channel
check purge purge_leaves_nothing

if [ $failures -gt 0 ]; then
    journalctl -b --no-pager -o short-monotonic >"$JOURNAL" 2>&1
    report "RESULT fail"
else
    report "RESULT ok"
fi
