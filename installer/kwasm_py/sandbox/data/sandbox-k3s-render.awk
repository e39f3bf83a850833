# Tiny renderer for the Go template actions k3s/rke2 containerd templates use (k3s STAND-IN).
#   awk -v base=FILE -v vars=FILE -v extra=FILE -v tmpl=NAME -f k3s-render.awk TEMPLATE
# base:  the base render ({{ template "base" . }} expands to it)
# vars:  KEY=VALUE lines for {{ .KEY }} (e.g. NodeConfig.AgentConfig.Snapshotter=overlayfs)
# extra: NAME<TAB>RUNTIME_TYPE<TAB>BINARY lines, what {{ range $k, $v := .ExtraRuntimes }} visits
# Understood: {{ template "base" . }}, {{ .Path }}, {{ if [not] .Path }} / {{ else }} / {{ end }},
# {{ range $k, $v := .ExtraRuntimes }} with {{ $k }} {{ $v.RuntimeType }} {{ $v.BinaryName }},
# {{/* comments */}} and the {{- / -}} whitespace trims. Anything else: exit 3, saying which.
function fail(msg) { print "k3s stand-in: " tmpl ": " msg > "/dev/stderr"; failed = 1; exit 3 }
function trim(s) { sub(/^[ \t\r\n]+/, "", s); sub(/[ \t\r\n]+$/, "", s); return s }
function truthy(v) { return v != "" && v != "false" && v != "0" }
function value(path,   k) {
  if (path in V) return V[path]
  fail("no value for {{ ." path " }} in this stand-in")
}
function active(   i) { for (i = 1; i <= depth; i++) if (!on[i]) return 0; return 1 }
BEGIN {
  while ((getline line < vars) > 0) { eq = index(line, "="); if (eq) V[substr(line, 1, eq - 1)] = substr(line, eq + 1) }
  close(vars)
  nx = 0
  while ((getline line < extra) > 0) { nx++; split(line, f, "\t"); XN[nx] = f[1]; XT[nx] = f[2]; XB[nx] = f[3] }
  close(extra)
  B = ""; while ((getline line < base) > 0) B = B line "\n"; close(base)
}
{ T = T $0 "\n" }
END {
  if (failed) exit 3
  # tokenize into text (K="t") and action (K="a") tokens, applying {{- and -}} trims
  n = 0; rest = T
  while ((s = index(rest, "{{")) > 0) {
    n++; K[n] = "t"; X[n] = substr(rest, 1, s - 1)
    rest = substr(rest, s + 2)
    e = index(rest, "}}"); if (!e) fail("unclosed {{")
    a = substr(rest, 1, e - 1); rest = substr(rest, e + 2)
    if (substr(a, 1, 1) == "-") { sub(/[ \t\r\n]+$/, "", X[n]); a = substr(a, 2) }
    rt = 0; if (a ~ /[ \t]-$/) { rt = 1; sub(/-$/, "", a) }
    n++; K[n] = "a"; X[n] = trim(a)
    if (rt) sub(/^[ \t\r\n]+/, "", rest)
  }
  n++; K[n] = "t"; X[n] = rest
  depth = 0; out = ""
  for (pc = 1; pc <= n; pc++) {
    if (K[pc] == "t") { if (active()) out = out X[pc]; continue }
    a = X[pc]
    if (a ~ /^\/\*.*\*\/$/) continue
    if (a ~ /^template[ \t]+"base"[ \t]+\.$/) { if (active()) out = out B; continue }
    if (a ~ /^if[ \t]/) {
      c = trim(substr(a, 3)); neg = 0
      if (c ~ /^not[ \t]/) { neg = 1; c = trim(substr(c, 4)) }
      if (c !~ /^\.[A-Za-z0-9_.]+$/) fail("unsupported condition {{ " a " }}")
      r = active() ? truthy(value(substr(c, 2))) : 0
      depth++; typ[depth] = "if"; on[depth] = neg ? !r : r; continue
    }
    if (a == "else") { if (!depth || typ[depth] != "if") fail("{{ else }} outside {{ if }}"); on[depth] = !on[depth]; continue }
    if (a ~ /^range[ \t]+\$k,[ \t]*\$v[ \t]*:=[ \t]*\.ExtraRuntimes$/) {
      depth++; typ[depth] = "range"; start[depth] = pc; item[depth] = 1; on[depth] = nx > 0; continue
    }
    if (a == "end") {
      if (!depth) fail("{{ end }} without an opening action")
      if (typ[depth] == "range" && on[depth] && item[depth] < nx) { item[depth]++; pc = start[depth]; continue }
      depth--; continue
    }
    if (a == "$k" || a ~ /^\$v\.(RuntimeType|BinaryName)$/) {
      for (d = depth; d > 0 && typ[d] != "range"; d--) ;
      if (!d) fail("{{ " a " }} outside {{ range }}")
      if (active()) out = out (a == "$k" ? XN[item[d]] : a ~ /RuntimeType/ ? XT[item[d]] : XB[item[d]])
      continue
    }
    if (a ~ /^\.[A-Za-z0-9_.]+$/) { if (active()) out = out value(substr(a, 2)); continue }
    fail("unsupported template action {{ " a " }}")
  }
  if (depth) fail("missing {{ end }}")
  printf "%s", out
}
