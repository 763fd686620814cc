"""What Bind Token can see of the graph it runs in (the API prompt), to stop wirings that would drop
the subject silently: a binding is data on the conditioning, so a node that keeps only another
conditioning's data loses it, and a model without Apply Nested Attention ignores it.

Only host nodes whose behaviour is known are judged; a path through any other node is trusted.
"""
from __future__ import annotations

from collections.abc import Iterator

BIND_TOKEN = "NestedAttentionBindToken"
APPLY = "NestedAttentionApply"
# host nodes that keep only conditioning_to's data: a bound conditioning given as conditioning_from is lost
KEEPS_ONLY_THE_FIRST = {"ConditioningConcat", "ConditioningAverage"}
ZEROES = {"ConditioningZeroOut"}


def _consumers(prompt: dict, node_id: str) -> Iterator[tuple[str, dict, str]]:
    """(id, node, input name) of every input linked to an output of node_id."""
    for other_id, node in prompt.items():
        for name, value in (node.get("inputs") or {}).items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id):
                yield str(other_id), node, name


def _passes_conditioning(node: dict) -> bool:
    kind = node.get("class_type", "")
    return kind == BIND_TOKEN or kind.startswith("Conditioning")


def _model_is_patched(prompt: dict, node: dict, seen: set) -> bool:
    """Whether the model a sampler/guider node gets passes through Apply Nested Attention (unknown nodes: trusted)."""
    link = (node.get("inputs") or {}).get("model")
    if not (isinstance(link, list) and len(link) == 2):
        return True  # a widget or no model input: nothing to judge
    source_id = str(link[0])
    source = prompt.get(source_id)
    if source is None or source_id in seen:
        return True
    seen.add(source_id)
    if source.get("class_type") == APPLY:
        return True
    inputs = source.get("inputs") or {}
    if "model" in inputs:
        return _model_is_patched(prompt, source, seen)
    # a loader (widgets only) starts the chain: no Apply on it. A node fed otherwise (a model merge, ...) is trusted
    return any(isinstance(v, list) and len(v) == 2 for v in inputs.values())


def check_bound_conditioning_use(prompt: dict | None, bind_node_id: str | None) -> None:
    """Raise ValueError naming the node and the fix if the conditioning of Bind Token `bind_node_id` reaches a
    node that would drop its subject, or a sampler whose model lacks Apply Nested Attention."""
    if not prompt or bind_node_id is None or str(bind_node_id) not in prompt:
        return
    todo, seen = [str(bind_node_id)], set()
    while todo:
        current = todo.pop()
        for node_id, node, name in _consumers(prompt, current):
            kind = node.get("class_type", "")
            where = f"{kind} (node {node_id})"
            if kind in KEEPS_ONLY_THE_FIRST and name == "conditioning_from":
                fix = ("and set conditioning_to_strength to 1 − its value" if kind == "ConditioningAverage"
                       else "(cross-attention does not depend on the order of concatenated prompts)")
                raise ValueError(
                    f"the bound conditioning goes into {where} as conditioning_from, and that node keeps only "
                    f"conditioning_to's data: the subject would be dropped without a word. Connect the bound conditioning "
                    f"to conditioning_to and the other one to conditioning_from {fix}"
                )
            if kind in ZEROES:
                raise ValueError(
                    f"the bound conditioning goes into {where}, which zeroes the prompt and the word the subject is bound "
                    "to: the subject would go into an empty prompt. Zero out an unbound conditioning (e.g. for the negative)"
                )
            if "model" in (node.get("inputs") or {}) and not _model_is_patched(prompt, node, set()):
                raise ValueError(
                    f"the bound conditioning is sampled by {where}, whose model does not pass through Apply Nested "
                    "Attention: the subject would be ignored. Put Apply Nested Attention on that model (between the "
                    "checkpoint loader and the sampler); to compare with the base model, give that sampler the "
                    "conditioning from before Bind Token"
                )
            if node_id not in seen and _passes_conditioning(node):
                seen.add(node_id)
                todo.append(node_id)
