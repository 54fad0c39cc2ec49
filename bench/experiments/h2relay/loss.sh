#!/bin/bash
# Packet loss on the server<->agent link: two network namespaces joined by a veth pair
# (10.77.0.1 = h2mix_s: server + load generator; 10.77.0.2 = h2mix_a: agent + echo app),
# random drops with iptables' statistic match on the agent side's veth (both directions),
# set by loss.py per case. Everything is removed on exit.
#   bash loss.sh [loss.py args]      e.g. bash loss.sh --rounds 3 --losses 0,0.01,0.03
set -euo pipefail
S=h2mix_s; A=h2mix_a
cleanup() {
  ip netns del "$S" 2>/dev/null || true   # deleting a namespace removes its veth end, the peer
  ip netns del "$A" 2>/dev/null || true   # and its iptables rules with it
}
trap cleanup EXIT INT TERM
cleanup
ip netns add "$S"; ip netns add "$A"
ip link add h2mix_vs type veth peer name h2mix_va
ip link set h2mix_vs netns "$S"; ip link set h2mix_va netns "$A"
ip -n "$S" addr add 10.77.0.1/24 dev h2mix_vs; ip -n "$A" addr add 10.77.0.2/24 dev h2mix_va
for ns in "$S" "$A"; do ip -n "$ns" link set lo up; done
ip -n "$S" link set h2mix_vs up; ip -n "$A" link set h2mix_va up
# No segmentation offloads: iptables then sees (and drops) MTU-sized segments, not 64 KB GSO packets.
ip netns exec "$S" ethtool -K h2mix_vs tso off gso off gro off >/dev/null
ip netns exec "$A" ethtool -K h2mix_va tso off gso off gro off >/dev/null
echo "# netns $S/$A, veth mtu $(ip -n "$A" -o link show h2mix_va | sed -n 's/.* mtu \([0-9]*\).*/\1/p'),"\
     "cc $(ip netns exec "$A" sysctl -n net.ipv4.tcp_congestion_control)/$(ip netns exec "$S" sysctl -n net.ipv4.tcp_congestion_control),"\
     "kernel $(uname -r)"
ip netns exec "$S" python3 "$(dirname "$0")/loss.py" --ns-agent "$A" "$@"
