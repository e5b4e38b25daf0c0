"""Forward hooks: the one place in the package that intercepts a module's forward pass.

Everything that reads activations goes through here: the probe (pooled block outputs), SCL-FT (the skip block's
output), the frozen-prefix cache (its trace, and the input of the first trainable block), truncation (the cut block's
output), the CKA and trial selection rules and the NC1 penalty. Three pieces:

* :func:`tap_output` / :func:`tap_input` register an observer on one module. An observer only reads: whatever it
  returns is dropped, so it can never replace a module's input or output by accident.
* :class:`HookSet` registers several and removes them all when its ``with`` block ends, however it ends (an
  exception, a stopped forward), so no hook outlives the work that needed it.
* :class:`ForwardStop` ends a forward pass from inside a hook once nothing after the tapped module is needed. Each
  stop catches only itself, so nested users never swallow each other's stop (a probe tapping inside an SCL
  classifier whose ``replace`` wiring stops on its own).

:func:`output_of` and :func:`input_of` combine them: run a forward only as far as one module and return what that
module produced or received.

Example::

    stop = ForwardStop()
    with HookSet() as hooks, stop:
        hooks.on_output(model.get_submodule("layer1"), lambda m, args, out: feats.append(out))
        hooks.on_output(model.get_submodule("layer2"), lambda m, args, out: stop())  # layer3... never run
        model(x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from torch import nn
from torch.utils.hooks import RemovableHandle

OutputObserver = Callable[..., None]
"""``(module, args, output)``, or ``(module, args, kwargs, output)`` with ``with_kwargs=True``."""
InputObserver = Callable[..., None]
"""``(module, args)``, or ``(module, args, kwargs)`` with ``with_kwargs=True``."""


class _Observer:
    """Calls ``fn`` and drops what it returns (a hook's return value would replace the module's input or output).

    An object rather than a closure so that ``copy.deepcopy`` of a model carries a hook bound to a method over to the
    copy of its owner, as torch does for a bare bound method.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        self.fn(*args)


def tap_output(module: nn.Module, fn: OutputObserver, *, prepend: bool = False,
               with_kwargs: bool = False) -> RemovableHandle:
    """Call ``fn`` after every forward of ``module``, with its output.

    Args:
        module: The tapped module.
        fn: The observer (its return value is ignored).
        prepend: Run before the hooks already on ``module`` (e.g. before one that stops the forward there).
        with_kwargs: Also pass the keyword arguments of the call.

    Returns:
        The handle; ``handle.remove()`` takes the tap off. Prefer a :class:`HookSet`, which always does.
    """
    return module.register_forward_hook(_Observer(fn), prepend=prepend, with_kwargs=with_kwargs)


def tap_input(module: nn.Module, fn: InputObserver, *, prepend: bool = False,
              with_kwargs: bool = False) -> RemovableHandle:
    """Call ``fn`` before every forward of ``module``, with its arguments (as :func:`tap_output`)."""
    return module.register_forward_pre_hook(_Observer(fn), prepend=prepend, with_kwargs=with_kwargs)


class HookSet:
    """Taps registered together and removed together.

    Use it as a context manager: every tap added inside the ``with`` block is removed when the block ends, also when
    it ends with an exception. :meth:`remove` does the same by hand (for taps that live across calls).
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def on_output(self, module: nn.Module, fn: OutputObserver, *, prepend: bool = False,
                  with_kwargs: bool = False) -> None:
        """Add :func:`tap_output` of ``module``."""
        self._handles.append(tap_output(module, fn, prepend=prepend, with_kwargs=with_kwargs))

    def on_input(self, module: nn.Module, fn: InputObserver, *, prepend: bool = False,
                 with_kwargs: bool = False) -> None:
        """Add :func:`tap_input` of ``module``."""
        self._handles.append(tap_input(module, fn, prepend=prepend, with_kwargs=with_kwargs))

    def remove(self) -> None:
        """Remove every tap of the set (the modules are as before); the set can be used again."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class ForwardStopped(Exception):
    """Raised by :meth:`ForwardStop.__call__` inside a hook; caught by the ``with`` block of the same stop."""

    def __init__(self, stop: ForwardStop) -> None:
        super().__init__("forward stopped by a hook")
        self.stop = stop


class ForwardStop:
    """End a forward pass early from inside a hook.

    Calling the object (in a hook) raises :class:`ForwardStopped`; ``with stop:`` around the forward catches that
    exception when it came from this same object and lets every other exception, other stops included, through.
    The object holds no state: one stop serves any number of forwards.
    """

    def __call__(self) -> NoReturn:
        raise ForwardStopped(self)

    def __enter__(self) -> ForwardStop:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return isinstance(exc, ForwardStopped) and exc.stop is self


def output_of(module: nn.Module, run: Callable[[], Any], *, name: str = "") -> Any:
    """Run a forward only until ``module`` has produced its output, and return that output.

    The stop runs after the hooks already on ``module``; nothing after ``module`` runs.

    Args:
        module: The module whose output is wanted.
        run: Runs the forward that calls ``module`` (e.g. ``lambda: model(**inputs)``).
        name: How the error message names ``module``.

    Raises:
        RuntimeError: ``module`` did not run in that forward.
    """
    captured: list[Any] = []
    stop = ForwardStop()

    def grab(_module: nn.Module, _args: tuple, output: Any) -> None:
        captured.append(output)
        stop()

    with HookSet() as hooks, stop:
        hooks.on_output(module, grab)
        run()
    if not captured:
        raise RuntimeError(f"{name or type(module).__name__} did not run in the forward")
    return captured[0]


def input_of(module: nn.Module, run: Callable[[], Any], *, name: str = "") -> tuple[tuple, dict[str, Any]]:
    """Run a forward only until ``module`` is called, and return its ``(args, kwargs)``; ``module`` itself never runs.

    The stop runs before the pre-hooks already on ``module``.

    Args:
        module: The module whose input is wanted.
        run: Runs the forward that calls ``module``.
        name: How the error message names ``module``.

    Raises:
        RuntimeError: ``module`` was not called in that forward.
    """
    captured: list[tuple[tuple, dict[str, Any]]] = []
    stop = ForwardStop()

    def grab(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        stop()

    with HookSet() as hooks, stop:
        hooks.on_input(module, grab, prepend=True, with_kwargs=True)
        run()
    if not captured:
        raise RuntimeError(f"{name or type(module).__name__} was not called in the forward")
    return captured[0]
