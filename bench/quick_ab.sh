#!/usr/bin/env bash
# Quick manual figure (issue 2): ab -n 20000 -c 50 direct to nginx vs through pydirector,
# with the balancer's CPU seconds from /proc.  Loopback only; stops by itself.
# The full harness (HAProxy, wrk, bulk, idle, rounds) is issue 5's job.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
N=${N:-20000}; C=${C:-50}
command -v nginx >/dev/null && command -v ab >/dev/null || apt-get install -y -qq nginx-light apache2-utils >/dev/null
work=$(mktemp -d)
mkdir -p "$work/www"; head -c 100 /dev/zero | tr '\0' x > "$work/www/small"
cat > "$work/nginx.conf" <<NGX
daemon off; worker_processes 1; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:18081 backlog=4096; root $work/www; } }
NGX
cat > "$work/pd.xml" <<XML
<pdconfig><service name="bench"><listen ip="127.0.0.1:18080"/>
<group name="main" scheduler="roundrobin"><host name="nginx" ip="127.0.0.1:18081"/></group>
</service><logging file="$work/pd.log"/></pdconfig>
XML
nginx -c "$work/nginx.conf" & ngx=$!
"$PY" pydirector.py -c "$work/pd.xml" & pd=$!
trap 'kill $pd $ngx 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:18080/small && break; sleep 0.1; done
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
tck=$(getconf CLK_TCK)
run() { timeout 120 ab -q -n "$N" -c "$C" "$1" 2>&1 | awk '/Requests per second/{print $4} /Failed requests/{f=$3} END{print "failed", f}'; }
for round in 1 2 3; do
  echo "round $round direct:   $(run http://127.0.0.1:18081/small | tr '\n' ' ')"
  before=$(cpu $pd)
  echo "round $round balancer: $(run http://127.0.0.1:18080/small | tr '\n' ' ') cpu_s $(awk -v a="$before" -v b="$(cpu $pd)" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')"
done
"$PY" --version
