#!/bin/bash
# The system test's checks, run as root inside the Debian 12 guest from the
# payload disk (which also holds the .deb, load.py and checks.env). Each check
# is a function; `check GROUP FUNCTION` runs it and reports one line to
# the host: PASS/FAIL NAME SECONDS [detail]. Groups: base (package and
# sockets, no daemon needed), daemon (runs, limits, operation), science (Debian's
# numpy, pandas and matplotlib after the offline install; needs base), collusion
# (two attacker runs at once on this guest's kernel; needs base), faults (kill -9
# of the zygote and of the service), purge.
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
    if [[ $group = daemon || $group = collusion ]] && [ -n "$daemon_down" ]; then
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
# run_json LANGUAGE CODE [RUN OPTION...]: a run over the native socket; prints the
# result JSON. Its exit status is the code's (non-zero for a bomb), so it is not
# checked: `field` fails loudly when the output is not a result.
run_json() { sandboxd run --json --language "$1" -c "$2" "${@:3}" || true; }
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

man_pages_and_examples_are_installed() {
    local file
    for file in /usr/share/man/man8/sandboxd.8.gz /usr/share/man/man5/sandboxd.toml.5.gz \
        /usr/share/doc/sandboxd/examples/haproxy/sandboxd.cfg \
        /usr/share/doc/sandboxd/examples/prometheus/sandboxd-alerts.yml; do
        [ -s "$file" ] || { echo "$file is missing"; return 1; }
    done
    zcat /usr/share/man/man8/sandboxd.8.gz | grep -q '^\.SS sandboxd mcp$' ||
        { echo "sandboxd(8) lacks the mcp command"; return 1; }
    zcat /usr/share/man/man5/sandboxd.toml.5.gz | grep -q 'max_workers' ||
        { echo "sandboxd.toml(5) lacks limits.max_workers"; return 1; }
}

security_exposure() {
    # Informational: systemd's own rating of the hardening (lower is better).
    systemd-analyze security --no-pager sandboxd.service | tail -1
}

# --- daemon: runs, limits, operation ----------------------------------------------

first_request_starts_the_service() {
    local out
    # Bounded like the service's own start (TimeoutStartSec): under emulation the
    # start, the data-science template's imports included, took 167 s.
    out=$(timeout 300 /usr/bin/sandboxd run -c 'print(1)') || return 1
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

# Nothing was synced (the guest has no network): Debian's packages serve at once.
offline_defaults_import() {
    local out
    # Three packages' imports take long under emulation: the daemon's largest timeout.
    out=$(run_json python3 'import jinja2, requests, httpx; print(jinja2.Template("{{ n }}").render(n=42), jinja2.__file__)' --timeout 60) || return 1
    expect status "$(field "$out" status)" ok || return 1
    expect stdout "$(field "$out" stdout)" "42 /usr/lib/python3/dist-packages/jinja2/__init__.py"
}

# --- science: Debian's numpy, pandas, matplotlib, installed offline as Recommends ---

# native_http_run CODE: POST /v1/run (the native request over HTTP); prints the result.
native_http_run() {
    local body
    body=$(python3 -c 'import json, sys; print(json.dumps({"language": "python3", "code": sys.argv[1], "timeout": 60}))' "$1")
    curl -sS --max-time 180 --fail-with-body -H "X-Api-Key: $API_KEY" -H 'Content-Type: application/json' \
        --data-binary "$body" http://127.0.0.1:8194/v1/run
}

science_packages_came_with_the_deb() {
    local package
    # Started here too when the daemon group is not selected; ready once every pool
    # (the data-science template's included) is warm.
    timeout 300 systemctl start sandboxd.service || return 1
    for package in python3-numpy python3-pandas python3-matplotlib; do
        expect "$package" "$(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>&1)" "ii " || return 1
    done
}

# An unmodified Dify request: the import scan sends it to the warm data-science pool.
pandas_over_dify_http() {
    expect stdout "$(dify_run python3 $'import pandas as pd\nframe = pd.DataFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]})\nprint(frame)\nprint(frame.groupby("k")["v"].sum().to_dict(), pd.__version__, pd.__file__)')" \
        $'   k  v\n0  a  1\n1  b  2\n2  a  3\n{\'a\': 4, \'b\': 2} 1.5.3 /usr/lib/python3/dist-packages/pandas/__init__.py'
}

# The open figure comes back in `images`: a PNG of the figure's size in pixels.
plot_over_native_http() {
    local out
    out=$(native_http_run $'import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3), dpi=100)\nplt.plot([1, 3, 2])\nplt.title("guest")\nprint("drawn")') || return 1
    expect status "$(field "$out" status)" ok || return 1
    expect stdout "$(field "$out" stdout)" drawn || return 1
    expect image "$(python3 -c '
import base64, json, struct, sys
[image] = json.loads(sys.argv[1])["images"]
data = base64.b64decode(image["base64"])
assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
print(image["mime"], *struct.unpack(">II", data[16:24]))' "$out" 2>&1)" "image/png 400 300"
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

# wait_busy_slot: until /metrics shows a run holding a slot (up to 120 s).
wait_busy_slot() {
    local i
    for i in $(seq 240); do
        curl -s --max-time 10 -H "X-Api-Key: $API_KEY" http://127.0.0.1:8194/metrics |
            grep -qx 'sandboxd_busy_slots [1-9][0-9]*' && return 0
        sleep 0.5
    done
    echo "no run held a slot within 120 s"
    return 1
}

# wait_active: a reload is asynchronous on systemd 252 (Type=notify): `systemctl
# reload` returns once SIGHUP is sent; the unit is "reloading" until READY=1, for
# at most the unit's TimeoutStartSec (300 s). Under emulation the new generation's
# data-science template (numpy, pandas, matplotlib imported and warmed) takes
# 100-250 s of that; on real hardware a few seconds.
wait_active() {
    local i
    for i in $(seq 600); do
        [ "$(systemctl is-active sandboxd.service)" = active ] && return 0
        sleep 0.5
    done
    echo "sandboxd.service still $(systemctl is-active sandboxd.service) after 300 s"
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
    # Stop once the run is in flight: it holds a slot (up to 120 s: the guest is emulated).
    wait_busy_slot || { wait $pid; return 1; }
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
# The image's resolv.conf is the build host's, whose name server this guest cannot
# reach: with a route, every lookup would wait out resolver timeouts (a reload's
# offline pip then outlasts systemd's 120 s reload timeout). Empty, lookups fail at
# once, as on a host with no resolver.
ensure_default_route() {
    : >/etc/resolv.conf
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

# [network] proxy with a squid on the guest's loopback: a run with network reaches an
# allowed domain through it (python requests, node fetch and http), gets squid's 403
# for another, and nothing directly. The guest has no network: squid's hosts_file maps
# both test domains to the guest itself, where a test server listens on every address.
proxied_run_reaches_only_the_proxy() {
    local config=/etc/sandboxd/sandboxd.toml status
    cp -a "$config" "$WORK/sandboxd.toml.orig"
    serve_through_a_proxy "$config"
    status=$?
    [ $status -eq 0 ] || { journalctl -u sandboxd.service --no-pager -o cat -n 5; tail -5 "$WORK/squid/cache.log"; }
    cp -a "$WORK/sandboxd.toml.orig" "$config"
    [ -f "$WORK/squid/squid.pid" ] && kill "$(cat "$WORK/squid/squid.pid")"
    [ -f "$WORK/www.pid" ] && kill "$(cat "$WORK/www.pid")"
    systemctl restart sandboxd.service || return 1
    [ $status -eq 0 ]
}

serve_through_a_proxy() {
    local dir=$WORK/squid port=3129
    ensure_default_route || { echo "no default route"; return 1; }
    mkdir -p "$dir" "$WORK/www"
    printf REACHED >"$WORK/www/index.html"
    echo "127.0.0.1 allowed.test denied.test" >"$dir/hosts"
    printf '%s\n' "http_port 127.0.0.1:$port" "pid_filename $dir/squid.pid" \
        "cache_log $dir/cache.log" "access_log stdio:$dir/access.log" "cache_store_log none" \
        "netdb_filename none" "pinger_enable off" "coredump_dir $dir" "hosts_file $dir/hosts" \
        "shutdown_lifetime 0 seconds" "cache deny all" "acl sandboxd_allowed dstdomain allowed.test" \
        "http_access allow sandboxd_allowed" "http_access deny all" >"$dir/squid.conf"
    chmod 755 "$WORK"  # mktemp -d made it 0700; squid runs as proxy
    chown -R proxy:proxy "$dir"
    /usr/sbin/squid -f "$dir/squid.conf" || { echo "squid did not start"; return 1; }
    (cd "$WORK/www" && exec python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1) &
    echo $! >"$WORK/www.pid"
    timeout 60 bash -c "until curl -s -o /dev/null http://127.0.0.1:8080/ && (exec 3<>/dev/tcp/127.0.0.1/$port); do sleep 0.5; done" ||
        { echo "squid or the test server did not listen"; return 1; }
    sed -i '/^\[network\]/,/^\[/ s/^#\? *mode = .*/mode = "allow"/' "$1"
    sed -i "/^\[network\]/,/^\[/ s|^#\? *proxy = .*|proxy = \"http://127.0.0.1:$port\"|" "$1"
    grep -A12 '^\[network\]' "$1" | grep -qx "proxy = \"http://127.0.0.1:$port\"" || { echo "config edit failed"; return 1; }
    systemctl restart sandboxd.service || return 1
    expect "python via squid" "$(dify_run python3 'import requests; print(requests.get("http://allowed.test:8080/", timeout=30).text)' true)" REACHED || return 1
    expect "squid's 403" "$(dify_run python3 'import requests; print(requests.get("http://denied.test:8080/", timeout=30).status_code)' true)" 403 || return 1
    expect "node fetch via squid" "$(dify_run nodejs 'fetch("http://allowed.test:8080/").then((r) => r.text()).then(console.log)' true)" REACHED || return 1
    expect "node http via squid" "$(dify_run nodejs 'require("http").get("http://allowed.test:8080/", (r) => { r.on("data", (c) => process.stdout.write(c)); })' true)" REACHED || return 1
    expect "direct connection" "$(dify_run python3 'import socket; s = socket.socket(); s.settimeout(5); print("MARKER" if s.connect_ex(("10.0.2.15", 8080)) == 0 else "refused")' true)" refused
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

# --- collusion: two attacker runs at once share no socket (kernel 6.1 here) ---------

MARKER=ESCAPED-7f3a
STAMP_PY='import atexit, time; print("START", time.monotonic()); atexit.register(lambda: print("END", time.monotonic()))'
STAMP_JS='const hr = () => Number(process.hrtime.bigint()) / 1e9; console.log("START", hr()); process.on("exit", () => console.log("END", hr()));'

stamped() { if [ "$1" = python3 ]; then printf '%s\n%s' "$STAMP_PY" "$2"; else printf '%s\n%s' "$STAMP_JS" "$2"; fi; }

# together ROUTE LANG_A CODE_A LANG_B CODE_B: both runs at once (ROUTE native, or
# dify with enable_network); fails if the marker shows, a run is not ok, or the two
# runs did not overlap in time.
together() {
    local route=$1 one
    if [ "$route" = native ]; then
        run_json "$2" "$(stamped "$2" "$3")" >"$WORK/tenant-a" &
        one=$!
        run_json "$4" "$(stamped "$4" "$5")" >"$WORK/tenant-b"
    else
        dify_run "$2" "$(stamped "$2" "$3")" true >"$WORK/tenant-a" &
        one=$!
        dify_run "$4" "$(stamped "$4" "$5")" true >"$WORK/tenant-b"
    fi
    wait "$one"
    python3 - "$route" "$MARKER" "$WORK/tenant-a" "$WORK/tenant-b" <<'PY'
import json, sys
route, marker, *paths = sys.argv[1:]
spans = []
for path in paths:
    text = open(path).read()
    if marker in text:
        sys.exit(f"escaped: {text}")
    if route == "native":
        result = json.loads(text)
        if result.get("status") != "ok":
            sys.exit(f"not ok: {text}")
        text = result["stdout"]
    stamps = dict(line.split()[:2] for line in text.splitlines() if line.split()[:1] in (["START"], ["END"]))
    if set(stamps) != {"START", "END"}:
        sys.exit(f"a run did not start or end: {text}")
    spans.append((float(stamps["START"]), float(stamps["END"])))
(a0, a1), (b0, b1) = spans
if not (a0 < b1 and b0 < a1):
    sys.exit(f"the runs did not overlap: {spans}")
print("overlapped, no escape")
PY
}

ABSTRACT_OFFER_PY='
import os, socket, time
end = time.monotonic() + 4
try:
    s = socket.socket(socket.AF_UNIX); s.bind("\0x"); s.listen(1); s.settimeout(4)
    c, _ = s.accept(); print("ESCAPED-7f3a accepted")
    socket.send_fds(c, [b"x"], [os.open("/", os.O_RDONLY)])
except OSError as error:
    print("closed:", error)
time.sleep(max(0, end - time.monotonic()))'
ABSTRACT_TRY_PY='
import os, socket, time
end = time.monotonic() + 4
while time.monotonic() < end:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect("\0x")
    except OSError:
        time.sleep(0.05); continue
    _, fds, _, _ = socket.recv_fds(s, 10, 4); os.fchdir(fds[0])
    for _ in range(30): os.chdir("..")
    print("ESCAPED-7f3a", os.listdir(".")); break'
ABSTRACT_OFFER_JS='
const net = require("net");
const server = net.createServer((c) => { console.log("ESCAPED-7f3a accepted"); c.destroy(); });
server.on("error", (e) => console.log("closed:", e.code));
server.listen("\0x"); setTimeout(() => server.close(), 4000);'
TAKE_PORT_PY='
import errno, socket, time
end, held = time.monotonic() + 4, {}
while time.monotonic() < end:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        if kind in held: continue
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("0.0.0.0", 8080)); held[kind] = s
        except OSError as error:
            s.close()
            if error.errno == errno.EADDRINUSE: print("ESCAPED-7f3a port held by another run")
    time.sleep(0.1)'
LISTEN_PY='
import select, socket, time
socks = []
for host, kind in (("0.0.0.0", socket.SOCK_STREAM), ("127.0.0.1", socket.SOCK_DGRAM)):
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind((host, 8081))
        if kind == socket.SOCK_STREAM: s.listen(4)
        socks.append(s)
    except OSError as error:
        print("closed:", error)
end = time.monotonic() + 4
while time.monotonic() < end:
    if select.select(socks, [], [], 0.2)[0]: print("ESCAPED-7f3a heard another run"); break'
REACH_PY='
import socket, time
end = time.monotonic() + 4
while time.monotonic() < end:
    try:
        socket.create_connection(("127.0.0.1", 8081), timeout=0.2).close(); print("ESCAPED-7f3a tcp")
    except OSError:
        pass
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 8081))
    except OSError:
        pass
    time.sleep(0.1)'

runs_share_no_abstract_socket() {
    together native python3 "$ABSTRACT_OFFER_PY" python3 "$ABSTRACT_TRY_PY" || return 1
    together native nodejs "$ABSTRACT_OFFER_JS" python3 "$ABSTRACT_TRY_PY"
}

runs_share_no_port() {
    together native python3 "$TAKE_PORT_PY" python3 "$TAKE_PORT_PY" || return 1
    together native python3 "$LISTEN_PY" python3 "$REACH_PY"
}

# The same with [network] mode = "allow": network runs share the egress namespace.
network_runs_share_no_socket_or_port() {
    local config=/etc/sandboxd/sandboxd.toml status=0
    cp -a "$config" "$WORK/sandboxd.toml.collusion"
    serve_with_network_allow "$config" || status=1
    [ $status -eq 0 ] && { together dify python3 "$ABSTRACT_OFFER_PY" python3 "$ABSTRACT_TRY_PY" || status=1; }
    [ $status -eq 0 ] && { together dify python3 "$TAKE_PORT_PY" python3 "$TAKE_PORT_PY" || status=1; }
    [ $status -eq 0 ] && { together dify python3 "$LISTEN_PY" python3 "$REACH_PY" || status=1; }
    cp -a "$WORK/sandboxd.toml.collusion" "$config"
    systemctl restart sandboxd.service || return 1
    return $status
}

# --- faults -----------------------------------------------------------------------

zygote_pid() { pgrep -P "$(main_pid)" -f sandboxd.zygote | head -1; }

# kill_the_zygote: SIGKILL the serving zygote, then wait (up to 180 s: the guest is
# emulated) until another one serves python3 runs; prints how long that took.
kill_the_zygote() {
    local old start
    old=$(zygote_pid)
    [ -n "$old" ] || { echo "no zygote under pid $(main_pid)"; return 1; }
    start=$(date +%s%N)
    kill -KILL "$old"
    while [ $(( $(date +%s%N) - start )) -lt 180000000000 ]; do
        if [ -n "$(zygote_pid)" ] && [ "$(zygote_pid)" != "$old" ] \
            && [ "$(sandboxd run -c 'print(12)' 2>/dev/null)" = 12 ]; then
            echo "served again $(( ($(date +%s%N) - start) / 1000000 )) ms after the kill"
            return 0
        fi
        sleep 0.2
    done
    echo "no new zygote served within 180 s"
    return 1
}

# kill -9 of the zygote under socket activation: a new generation serves, with no
# service restart, and every request of the load got an answer.
killed_zygote_heals_without_restart() {
    local pid restarts counts
    expect "run" "$(sandboxd run -c 'print(11)')" 11 || return 1
    pid=$(main_pid)
    restarts=$(systemctl show -P NRestarts sandboxd.service)
    counts=$(with_load kill_the_zygote) || { echo "$counts"; return 1; }
    expect "refused and silent" "$(field "$counts" refused) $(field "$counts" silent)" "0 0" || { echo "$counts"; return 1; }
    expect "main pid" "$(main_pid)" "$pid" || return 1
    expect "restarts" "$(systemctl show -P NRestarts sandboxd.service)" "$restarts" || return 1
    journalctl -u sandboxd.service --no-pager -o cat | grep -q "healed: generation" || { echo "no heal logged"; return 1; }
    echo "$counts"
}

# stale_pool_cgroups PID: cgroups under sandboxd.slice that are neither the service's
# nor a pool scope of daemon PID.
stale_pool_cgroups() {
    find /sys/fs/cgroup/sandboxd.slice -mindepth 1 -maxdepth 1 -type d -printf '%f\n' \
        | grep -v -x -e sandboxd.service -e "sandboxd-pool-$1-[0-9]*\.scope"
}

# systemctl kill -s KILL: systemd restarts the daemon (Restart=on-failure), and the
# killed daemon's pool scopes and cgroups are gone once the new one serves.
killed_service_restarts_clean() {
    local old new i stale
    expect "run" "$(sandboxd run -c 'print(13)')" 13 || return 1
    old=$(main_pid)
    [ -n "$(pool_scopes)" ] || { echo "no pool scope while the daemon runs"; return 1; }
    systemctl kill -s KILL sandboxd.service || return 1
    for i in $(seq 480); do
        new=$(main_pid)
        [ "$new" != 0 ] && [ "$new" != "$old" ] && [ "$(systemctl is-active sandboxd.service)" = active ] && break
        sleep 0.5
    done
    [ "$new" != "$old" ] || { echo "not restarted"; return 1; }
    expect "run after the restart" "$(sandboxd run -c 'print(14)')" 14 || return 1
    for i in $(seq 60); do
        stale=$(pool_scopes | grep -v -x "sandboxd-pool-$new-[0-9]*\.scope"; stale_pool_cgroups "$new")
        [ -z "$stale" ] && break
        sleep 0.5
    done
    [ -z "$stale" ] || { echo "stale after 30 s: $stale"; return 1; }
    echo "old pid $old, new pid $new, scopes: $(pool_scopes | tr '\n' ' ')"
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
check base man_pages_and_examples_are_installed
check base security_exposure
check daemon first_request_starts_the_service
check daemon daemon_can_read_kernel_log
check daemon python_over_unix_socket
check daemon nodejs_over_unix_socket
check daemon python_over_http
check daemon nodejs_over_http
check daemon offline_defaults_import
check daemon http_requires_the_api_key
check science science_packages_came_with_the_deb
check science pandas_over_dify_http
check science plot_over_native_http
check collusion runs_share_no_abstract_socket
check collusion runs_share_no_port
check collusion network_runs_share_no_socket_or_port
check daemon memory_bomb_gets_memory_verdict
check daemon fork_bomb_gets_tasks_verdict
check daemon non_member_is_refused_member_is_served
check daemon reload_keeps_serving
check daemon restart_refuses_no_one
check daemon units_are_only_the_live_pool
check daemon stop_finishes_in_flight_runs
check daemon stop_leaves_no_pool_scope
check daemon network_allow_mode_serves
check daemon proxied_run_reaches_only_the_proxy
check daemon never_restarted_by_failure_or_watchdog
check collusion runs_share_no_file_channel
check faults killed_zygote_heals_without_restart
check faults killed_service_restarts_clean
check purge purge_leaves_nothing

if [ $failures -gt 0 ]; then
    journalctl -b --no-pager -o short-monotonic >"$JOURNAL" 2>&1
    report "RESULT fail"
else
    report "RESULT ok"
fi
