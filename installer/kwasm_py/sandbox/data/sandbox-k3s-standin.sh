#!/bin/sh
# k3s STAND-IN for kwasm-py sandbox nodes. This is NOT k3s.
#
# It reproduces only the part of k3s that a containerd installer meets on a node:
#   1. render /var/lib/rancher/k3s/agent/etc/containerd/config.toml on every start, from
#      config-v3.toml.tmpl (containerd 2.x) or config.toml.tmpl when present, else from the
#      base config, with k3s-render.awk: `{{ template "base" . }}` expands to the base config,
#      and the other actions k3s's templates use ({{ .NodeConfig... }}, if/else/end, range over
#      .ExtraRuntimes) are rendered with this stand-in's values; any other action is refused;
#      like k3s (pkg/agent/containerd/runtimes.go), a containerd-shim-spin-v2 on its PATH
#      adds a `spin` runtime to the base config (and to .ExtraRuntimes);
#   2. run containerd with that config and k3s's socket, state and root:
#      containerd -c CONFIG -a /run/k3s/containerd/containerd.sock
#                 --state /run/k3s/containerd --root /var/lib/rancher/k3s/agent/containerd
# Real k3s keeps containerd as a child process; this script execs it, so the unit's main
# process is containerd. No kubelet, no API server, no config.toml.d drop-ins.
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

if [ "$major" -ge 2 ]; then cri=io.containerd.cri.v1.runtime; else cri=io.containerd.grpc.v1.cri; fi
work=$(mktemp -d)
: > "$work/extra"
cp "$base" "$work/base"
for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
  if [ -x "$d/containerd-shim-spin-v2" ]; then
    printf 'spin\tio.containerd.spin.v2\t%s\n' "$d/containerd-shim-spin-v2" > "$work/extra"
    printf '\n[plugins."%s".containerd.runtimes."spin"]\n  runtime_type = "io.containerd.spin.v2"\n[plugins."%s".containerd.runtimes."spin".options]\n  BinaryName = "%s"\n  SystemdCgroup = false\n' \
      "$cri" "$cri" "$d/containerd-shim-spin-v2" >> "$work/base"
    echo "k3s stand-in: found $d/containerd-shim-spin-v2: added runtime spin" >&2
    break
  fi
done
cat > "$work/vars" <<EOV
Program=k3s
NodeConfig.Containerd.Opt=/var/lib/rancher/k3s/agent/containerd
NodeConfig.SELinux=false
EnableUnprivileged=true
NodeConfig.AgentConfig.PauseImage=rancher/mirrored-pause:3.6
NodeConfig.AgentConfig.Snapshotter=overlayfs
NodeConfig.NoFlannel=false
NodeConfig.AgentConfig.CNIBinDir=/var/lib/rancher/k3s/data/current/bin
NodeConfig.AgentConfig.CNIConfDir=/var/lib/rancher/k3s/agent/etc/cni/net.d
SystemdCgroup=false
EOV
if [ -n "$tmpl" ]; then
  awk -v base="$work/base" -v vars="$work/vars" -v extra="$work/extra" -v tmpl="$tmpl" \
    -f "$share/k3s-render.awk" "$tmpl" > "$out.tmp" || { rm -rf "$work"; exit 3; }
else
  cp "$work/base" "$out.tmp"
fi
rm -rf "$work"
mv "$out.tmp" "$out"
echo "k3s stand-in ($mode): rendered $out from ${tmpl:-the base config}; containerd $version" >&2

exec containerd -c "$out" -a "$sock_dir/containerd.sock" --state "$sock_dir" \
  --root /var/lib/rancher/k3s/agent/containerd
