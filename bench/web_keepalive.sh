#!/bin/bash
# Loads noVNC's page the way a browser does, over https:// from `wsbridge --web`: vnc.html and
# every .js file of Debian's noVNC (apt-get install novnc), one request after another with curl,
# which reuses a connection when the server keeps it. Prints the requests, the TCP (and TLS)
# connections they took, and the wall time.
#
#   bench/web_keepalive.sh BINARY [PORT]      e.g. bench/web_keepalive.sh target/release/wsbridge
set -euo pipefail
B=$1
P=${2:-17400}
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$dir/key.pem" \
    -out "$dir/cert.pem" -subj /CN=localhost -days 2 2>/dev/null
"$B" --web /usr/share/novnc --cert "$dir/cert.pem" --key "$dir/key.pem" "127.0.0.1:$P" 127.0.0.1:5999 2>/dev/null &
pid=$!
for _ in $(seq 100); do curl -sk -o /dev/null "https://127.0.0.1:$P/vnc.html" && break; sleep 0.1; done
args=(-o /dev/null "https://127.0.0.1:$P/vnc.html")
for f in $(cd /usr/share/novnc && find . -name "*.js" | sort); do args+=(-o /dev/null "https://127.0.0.1:$P/${f#./}"); done
start=$(date +%s.%N)
curl -sk -w '%{num_connects}\n' "${args[@]}" | awk '{s+=$1; n++} END {printf "%d requests, %d connections, ", n, s}'
end=$(date +%s.%N)
echo "$(echo "$end - $start" | bc) s"
