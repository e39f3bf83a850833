#!/bin/sh
# k3s STAND-IN for kwasm-py sandbox nodes. This is NOT k3s.
#
# It reproduces only the part of k3s that a containerd installer meets on a node:
#   1. render /var/lib/rancher/k3s/agent/etc/containerd/config.toml on every start, from
#      config-v3.toml.tmpl (containerd 2.x) or config.toml.tmpl when present, else from the
#      base config; the one template action understood is a line `{{ template "base" . }}`,
#      which expands to the base config (any other `{{ ... }}` action is refused, loudly);
#   2. run containerd with that config and k3s's socket, state and root:
#      containerd -c CONFIG -a /run/k3s/containerd/containerd.sock
#                 --state /run/k3s/containerd --root /var/lib/rancher/k3s/agent/containerd
# Real k3s keeps containerd as a child process; this script execs it, so the unit's main
# process is containerd. No kubelet, no API server, no Go templates, no config.toml.d drop-ins.
set -eu
mode=${1:-server}
dir=/var/lib/rancher/k3s/agent/etc/containerd
share=/usr/local/share/kwasm-sandbox
sock_dir=/run/k3s/containerd
out=$dir/config.toml
mkdir -p "$dir" "$sock_dir" /var/lib/rancher/k3s/agent/containerd

set -- $(containerd --version)
version=${3#v}
major=${version%%.*}

if [ "$major" -ge 2 ] && [ -f "$dir/config-v3.toml.tmpl" ]; then
  tmpl=$dir/config-v3.toml.tmpl base=$share/k3s-base-v3.toml
elif [ -f "$dir/config.toml.tmpl" ]; then
  tmpl=$dir/config.toml.tmpl base=$share/k3s-base-v2.toml
elif [ "$major" -ge 2 ]; then
  tmpl= base=$share/k3s-base-v3.toml
else
  tmpl= base=$share/k3s-base-v2.toml
fi

if [ -n "$tmpl" ]; then
  awk -v base="$base" -v tmpl="$tmpl" '
    index($0, "{{") {
      s = $0; gsub(/[ \t-]/, "", s)
      if (s == "{{template\"base\".}}") {
        while ((getline line < base) > 0) print line
        close(base); next
      }
      print "k3s stand-in: " tmpl ":" NR ": unsupported template action (only {{ template \"base\" . }}): " $0 > "/dev/stderr"
      exit 3
    }
    { print }' "$tmpl" > "$out.tmp"
else
  cp "$base" "$out.tmp"
fi
mv "$out.tmp" "$out"
echo "k3s stand-in ($mode): rendered $out from ${tmpl:-the base config}; containerd $version" >&2

exec containerd -c "$out" -a "$sock_dir/containerd.sock" --state "$sock_dir" \
  --root /var/lib/rancher/k3s/agent/containerd
