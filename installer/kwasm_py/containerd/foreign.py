"""Templates of other tools found where containerd's own config should be (pure).

Node images and node agents render containerd's config from templates of their own and leave
only the render on the node: AKS AgentBaker (Go text/template, `aks-node-controller/parser/
templates/containerd*.toml.gtpl`), EKS nodeadm (Go text/template, `nodeadm/internal/containerd/
config2.template.toml`), Bottlerocket (Handlebars, `packages/containerd/containerd-config-toml_*`,
rendered by its settings API). Such a template at the path containerd reads is not TOML:
containerd refuses to start on it, and editing it as TOML would be wrong twice over (the shared
configs' SOURCES.md: a tool must never edit the raw templates as if they were TOML).
`recognise` says what the text is, so that the refusal names the tool and its own route.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kwasm_py.containerd import template


@dataclass(frozen=True)
class Origin:
    """A tool whose containerd templates are recognisable by names only its actions use."""

    tool: str
    markers: tuple[str, ...]  # substrings of `{{ ... }}` actions that only this tool's templates use
    route: str  # how a node of that tool gets a changed containerd config


#: Known tools, each with the names its templates read (from the files cited in the docstring).
ORIGINS: tuple[Origin, ...] = (
    Origin(
        "Bottlerocket",
        (
            "settings.",
        ),  # {{settings.kubernetes.pod-infra-container-image}}, {{#if settings.container-runtime...}}
        "Bottlerocket renders it from its settings API into /etc/containerd/config.toml on a "
        "read-only root: change containerd through Bottlerocket settings, not by editing files",
    ),
    Origin(
        "AKS AgentBaker",
        (".KubeletConfig", ".KubeBinaryConfig", "getEnableNvidia"),
        "AgentBaker renders it when it provisions the node, and the node holds only the render: "
        "put the rendered config.toml there (re-provision the node), then run kwasm-py again",
    ),
    Origin(
        "EKS nodeadm",
        (".SandboxImage", ".RuntimeBinaryName"),
        "nodeadm renders it at boot (`nodeadm init`, merging NodeConfig spec.containerd.config "
        "into it), and the node holds only the render: run nodeadm, then kwasm-py again",
    ),
)
GENERIC_ROUTE = (
    "containerd reads this file as it is, so the node must hold the template's render: put the "
    "rendered config there (the tool that owns the template renders it), then run kwasm-py again"
)
# Handlebars block helpers ({{#if}}, {{/if}}, not Go's {{/* comment */}}) and triple-stash {{{x}}}.
_HANDLEBARS = re.compile(r"\{\{~?(#|/(?!\*)|\{)")


@dataclass(frozen=True)
class RawTemplate:
    """What a template found in place of a config is: its language, the tool it belongs to
    ("" when no known tool's names appear), that tool's route, and its first action."""

    language: str  # "Go" (text/template) or "Handlebars"
    tool: str
    route: str
    line: int  # 1-based line of the first action
    action: str  # the first action, on one line, at most 60 characters


def recognise(text: str) -> RawTemplate | None:
    """The raw template `text` is, or None when it is a config (no `{{ ... }}` action, or TOML
    as a whole: a plain config whose strings hold `{{`, see `template.split`). Raises nothing."""
    prelude, _tail = template.split(text)
    if not prelude:
        return None
    found = template.actions(text)
    actions = [m.group(0) for m in found]
    language = "Handlebars" if any(_HANDLEBARS.match(a) for a in actions) else "Go"
    origin = next((o for o in ORIGINS if any(k in a for a in actions for k in o.markers)), None)
    first = found[0]
    shown = " ".join(first.group(0).split())
    return RawTemplate(
        language=language,
        tool=origin.tool if origin else "",
        route=origin.route if origin else GENERIC_ROUTE,
        line=text.count("\n", 0, first.start()) + 1,
        action=shown if len(shown) <= 60 else shown[:57] + "...",
    )
