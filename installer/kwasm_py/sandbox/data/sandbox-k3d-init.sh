#!/bin/sh
# k3d-like node init for kwasm-py sandbox nodes (a stand-in, not k3d): there is no systemd.
# This script is PID 1 of the node. It runs the k3s stand-in (which renders containerd's config
# and execs containerd) as its child, and starts it again whenever it exits, so a node agent
# restarts containerd by signalling the `containerd` child of PID 1 (`--restart signal:containerd`).
# (In real k3d, k3s is PID 1, exits when its containerd exits, and Docker restarts the node
# container; the effect seen from the node's filesystem and socket is the same.)
child=
stopping=0
trap 'stopping=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
  /usr/local/bin/k3s server &
  child=$!
  rc=0
  wait "$child" || rc=$?
  # A trapped signal interrupts `wait`: wait again until the child really exited.
  while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done
  child=
  [ "$stopping" = 0 ] || exit 0
  echo "k3d-like init: containerd exited (status $rc); starting it again" >&2
  # Back off after a failure so a config containerd rejects does not spin the CPU.
  [ "$rc" = 0 ] || [ "$rc" = 143 ] || sleep 1
done
