"""When an offloaded module needs its parameters, and when their gradients are final.

:class:`ModuleHook` is installed on every module that owns parameters directly. Its forward
pre-hook asks the owner to bring the module's parameters in, its forward hook lets them go and
wraps the outputs in :class:`PreBackward`, an identity whose backward asks for the parameters
again before the module's own backward runs (and lets the owner read the optimizer state of
those parameters ahead). The hooks also count, per parameter, the module calls of forward
that may be backpropagated (``uses``: calls with grad enabled, outside backward) and the calls
whose backward has started (``fetched``): when a parameter's gradient is accumulated and
every such call has started its backward, autograd will not add to that gradient again in
this backward, and the owner may update the parameter at once. Forward calls inside backward
(an activation checkpoint's recomputation) are not counted, and a checkpointed forward run
without grad is not either: its recomputation's backward is what counts.

The owner (:class:`memascend.offload.OffloadedModel`) provides ``fetch(names, hold)``,
``release_forward(names)``, ``fetch_for_backward(names)``, ``before_forward()``,
``name_of`` (id -> name) and ``saved`` (:class:`memascend.saved_views.SavedParamViews`).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


class PreBackward(torch.autograd.Function):
    """Identity on a module's outputs whose backward first fetches the module's params."""

    @staticmethod
    def forward(ctx, hook, *outputs):  # noqa: D102
        ctx.hook = hook
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        ctx.hook.fetch_for_backward()
        return (None, *grads)


class ModuleHook:
    """The fetch/release logic of one module that owns parameters directly."""

    def __init__(self, owner: Any, module: torch.nn.Module, names: list[str]):
        self.owner = owner
        self.module = module
        self.names = names  # keys of the module's direct parameters
        self.pushed = 0  # saved-tensor hooks pushed by pre_forward, not yet popped

    def params(self) -> Iterator[str]:
        for p in self.module._parameters.values():
            if p is not None:
                yield self.owner.name_of[id(p)]

    def pre_forward(self, module: Any, args: Any) -> None:
        names = list(self.params())
        if not in_backward():
            self.owner.before_forward()
            if torch.is_grad_enabled():
                uses = self.owner.uses
                for n in names:
                    uses[n] = uses.get(n, 0) + 1
        self.owner.fetch(names, hold="fwd")
        if torch.is_grad_enabled():
            self.owner.saved.push()
            self.pushed += 1

    def post_forward(self, module: Any, args: Any, output: Any) -> Any:
        # Registered with always_call=True: also runs when forward raised, so the saved-tensor
        # hooks pushed above are always popped.
        if self.pushed:
            self.pushed -= 1
            self.owner.saved.pop()
        self.owner.release_forward(list(self.params()))
        if not torch.is_grad_enabled():
            return output
        return wrap_outputs(self, output)

    def fetch_for_backward(self) -> None:
        names = list(self.params())
        fetched = self.owner.fetched
        for n in names:
            fetched[n] = fetched.get(n, 0) + 1
        self.owner.fetch_for_backward(names)


def wrap_outputs(hook: ModuleHook, output: Any) -> Any:
    """``output`` with its grad-requiring tensors routed through :class:`PreBackward`."""
    if isinstance(output, torch.Tensor):
        if output.requires_grad:
            return PreBackward.apply(hook, output)[0]
        return output
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        tensors = [o for o in output if isinstance(o, torch.Tensor) and o.requires_grad]
        if not tensors:
            return output
        wrapped = iter(PreBackward.apply(hook, *tensors))
        return tuple(next(wrapped) if isinstance(o, torch.Tensor) and o.requires_grad else o
                     for o in output)
    return output  # other structures: parameters are fetched on demand by their own modules


def install(owner: Any, model: torch.nn.Module) -> list[Any]:
    """Hooks on every parameter-owning module of ``model``; the handles to remove them."""
    handles = []
    for module in model.modules():
        names = [owner.name_of[id(p)] for p in module._parameters.values() if p is not None]
        if not names:
            continue
        h = ModuleHook(owner, module, names)
        handles.append(module.register_forward_pre_hook(h.pre_forward))
        handles.append(module.register_forward_hook(h.post_forward, always_call=True))
    return handles
