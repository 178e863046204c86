"""Pull once per node under ``torch.distributed``: local rank 0 downloads, the other ranks read its cache.

    local rank 0:   fn() ──────┐                                  ┌──► result
    other ranks:    (waiting) ─┴─ gather 1 ──► fn() (cache hit) ───┴─ gather 2 ──► result
                    a leader failed: all raise, nobody runs fn     a rank failed: all raise

:func:`run_once_per_node` is the one hook ``hubload.pull``/``hubload.load`` go through. It detects an
initialised process group without importing torch (only if ``torch.distributed`` is already imported), so
single-process use pays nothing. The statuses travel as picklable objects over the default group
(``all_gather_object``): with gloo on CPU, or NCCL once ``torch.cuda.set_device(local_rank)`` was called.

Every rank must make the same sequence of calls: a hubload call made by only some ranks (``if rank == 0:
hubload.pull(...)``) would wait for the others forever. Such code can pass ``distributed=False`` where the
API offers it, or set ``HUBLOAD_DISTRIBUTED=0``. Calls nested inside ``fn`` (``load`` → ``pull``) run
directly: only the outermost call is collective.

A load into a sharded (DTensor) model is all or nothing across ranks: each rank reads its own shards, then
every rank votes once with :func:`agree` before any model changes::

    every rank:  check ─► read own shards ─┬─ agree (one all_gather_object) ─► commit
                 a rank failed earlier ─────┘   (:func:`all_or_nothing` votes for it on the way out)
                 one rank failed: every rank raises; nobody committed, nobody waits forever
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import HubloadError

__all__ = ["agree", "all_or_nothing", "is_distributed", "local_rank", "run_once_per_node"]

log = logging.getLogger("hubload")

T = TypeVar("T")

# True while a rank runs fn: a nested hubload call must not start a second collective (the leader
# would enter it alone and wait forever).
_inside = contextvars.ContextVar("hubload_distributed_inside", default=False)

_FALSE = {"0", "false", "no", "off"}


class _Ballot:
    """Whether this rank has voted in the current :func:`all_or_nothing` step."""

    voted = False


# The open all_or_nothing step of this rank (None outside one).
_ballot: contextvars.ContextVar[_Ballot | None] = contextvars.ContextVar("hubload_distributed_ballot", default=None)


def process_group() -> Any | None:
    """``torch.distributed`` when it is imported, available and initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if not dist.is_available() or not dist.is_initialized():
            return None
    except Exception:  # a half-imported or stubbed module: behave as single-process
        return None
    return dist


def is_distributed(enabled: bool | None = None) -> bool:
    """Whether hubload calls coordinate across ranks now.

    Args:
        enabled: False turns coordination off; None reads ``HUBLOAD_DISTRIBUTED`` (default on).

    Returns:
        True under an initialised ``torch.distributed`` process group with more than one rank.
    """
    if enabled is None:
        enabled = os.environ.get("HUBLOAD_DISTRIBUTED", "1").strip().lower() not in _FALSE
    if not enabled or _inside.get():
        return False
    dist = process_group()
    return dist is not None and dist.get_world_size() > 1


def local_rank(rank: int | None = None) -> int:
    """This process's rank on its node.

    ``LOCAL_RANK`` (set by torchrun, SLURM wrappers, DeepSpeed) wins; else ``rank % LOCAL_WORLD_SIZE``;
    else the global rank, i.e. one node. A wrong guess costs a duplicate download, never a wrong file:
    every rank still reads through the verified cache.

    Args:
        rank: The global rank (default: from the process group, or ``RANK``).
    """
    env = os.environ.get("LOCAL_RANK")
    if env not in (None, ""):
        return int(env)
    if rank is None:
        dist = process_group()
        rank = dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))
    lws = os.environ.get("LOCAL_WORLD_SIZE")
    if lws not in (None, "") and int(lws) > 0:
        return rank % int(lws)
    return rank


def _node_key() -> str:
    """What identifies this node: torchrun's GROUP_RANK, else the host name."""
    group = os.environ.get("GROUP_RANK")
    return f"group-{group}" if group not in (None, "") else socket.gethostname()


def _status(exc: BaseException | None) -> dict[str, Any]:
    """A picklable outcome: the exception itself when it survives a pickle round trip, else its text."""
    if exc is None:
        return {"ok": True}
    blob: bytes | None
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # exceptions with unusual __init__ signatures do not round-trip
        blob = None
    return {"ok": False, "type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc),
            "pickle": blob}


def _error(status: dict[str, Any], rank: int, label: str, role: str) -> BaseException:
    """The exception to raise on this rank for another rank's failure."""
    exc: BaseException | None = None
    if status.get("pickle"):
        try:
            exc = pickle.loads(status["pickle"])
        except Exception:  # the class is not importable here
            exc = None
    if not isinstance(exc, BaseException):
        exc = HubloadError(f"{label or 'hubload'}: {role} (global rank {rank}) failed with {status['type']}: "
                           f"{status['message']}")
    exc.add_note(f"hubload: raised on global rank {rank} ({role}); every rank raises it so none waits forever")
    return exc


def _gather(dist: Any, item: dict[str, Any]) -> list[dict[str, Any]]:
    """all_gather_object over the default group."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def _call(fn: Callable[[], T]) -> T:
    """Run fn with nested hubload calls made non-collective."""
    token = _inside.set(True)
    try:
        return fn()
    finally:
        _inside.reset(token)


def run_once_per_node(fn: Callable[[], T], *, label: str = "", enabled: bool | None = None) -> T:
    """Run ``fn`` on local rank 0 of each node first, then on the other ranks; return its result everywhere.

    ``fn`` should make its result available locally (e.g. pull into the cache) and be cheap when run
    again (a warm cache hit). Without an initialised multi-rank process group this is just ``fn()``.

    Two collectives, entered by every rank whatever happens: after the leaders ran ``fn`` (the other
    ranks wait in it: that is the barrier), and after the other ranks ran it. If a leader failed, every
    rank of the job raises that error without running ``fn``; if any rank failed in the second step,
    every rank raises. A rank raises the original exception type when it can be unpickled (so
    ``except HashMismatchError`` works on every rank), else :class:`~hubload.errors.HubloadError`.

    Args:
        fn: The work, e.g. ``lambda: hubload.pull("all-minilm-l6-v2")``.
        label: Names the work in logs and error messages (model ID).
        enabled: False: always just ``fn()``; None: ``HUBLOAD_DISTRIBUTED`` (default on).

    Returns:
        What ``fn`` returned on this rank.

    Raises:
        Exception: The first error any rank hit, on every rank.
    """
    if not is_distributed(enabled):
        return fn()
    dist = process_group()
    rank = dist.get_rank()
    leader = local_rank(rank) == 0
    node = _node_key()

    result: Any = None
    error: BaseException | None = None
    if leader:
        log.debug("%s: rank %d pulls for node %s", label, rank, node)
        try:
            result = _call(fn)
        except Exception as exc:
            error = exc
    else:
        log.debug("%s: rank %d waits for local rank 0 of node %s", label, rank, node)
    first = _gather(dist, {"node": node, "leader": leader, "status": _status(error) if leader else None})

    # Any leader's failure stops every rank: a job with one node short of weights cannot run anyway.
    failed = [(r, s) for r, s in enumerate(first) if s["leader"] and not s["status"]["ok"]]
    if failed:
        ours = [(r, s) for r, s in failed if s["node"] == node] or failed
        if error is not None:
            raise error
        r, s = ours[0]
        raise _error(s["status"], r, label, "local rank 0")

    if not leader:
        if not any(s["leader"] and s["node"] == node for s in first):
            log.warning("%s: no rank with local rank 0 on node %s (check LOCAL_RANK); rank %d pulls itself",
                        label, node, rank)
        try:
            result = _call(fn)
        except Exception as exc:
            error = exc
    second = _gather(dist, _status(error if not leader else None))
    failed2 = [(r, s) for r, s in enumerate(second) if not s["ok"]]
    if failed2:
        if error is not None:
            raise error
        r, s = failed2[0]
        raise _error(s, r, label, f"rank {r}")
    return result


def agree(error: BaseException | None = None, *, label: str = "", enabled: bool | None = None) -> None:
    """Vote with every rank on whether a step succeeded; raise on every rank if any rank failed.

    One ``all_gather_object`` of a small status; every rank must call it once per step. Without an initialised
    multi-rank process group (or with coordination off) it only raises ``error`` if there is one.

    Args:
        error: This rank's failure, or None.
        label: Names the step in messages (a file, a model ID).
        enabled: As for :func:`is_distributed`.

    Raises:
        Exception: ``error`` on the rank that had it; on the others, that error (when it unpickles to a
            HubloadError) or a :class:`~hubload.errors.HubloadError` naming the failed rank.
    """
    if not is_distributed(enabled):
        if error is not None:
            raise error
        return
    ballot = _ballot.get()
    if ballot is not None:
        ballot.voted = True
    dist = process_group()
    statuses = _gather(dist, _status(error))
    failed = [(r, s) for r, s in enumerate(statuses) if not s["ok"]]
    if not failed:
        return
    if error is not None:
        raise error
    r, s = failed[0]
    exc = _error(s, r, label, f"rank {r}")
    if not isinstance(exc, HubloadError):
        wrapped = HubloadError(f"{label or 'hubload'}: rank {r} failed with {s['type']}: {s['message']}; nothing "
                               "was loaded on any rank")
        raise wrapped from exc
    raise exc


@contextlib.contextmanager
def all_or_nothing(*, label: str = "", enabled: bool | None = None) -> Iterator[None]:
    """A step that succeeds on every rank or fails on every rank, wherever in it a rank fails.

    Inside, code votes with :func:`agree` just before it commits (the sharded torch apply does). A rank that
    raises before voting votes "failed" on its way out, so the ranks waiting in :func:`agree` learn of it
    instead of waiting forever; a rank that never needed to vote votes "ok" at the end. Every rank must enter
    the step (same sequence of hubload calls on every rank).

    Args:
        label: Names the step in messages.
        enabled: As for :func:`is_distributed`; False makes this a no-op.

    Raises:
        Exception: Any rank's failure, on every rank (see :func:`agree`).
    """
    if not is_distributed(enabled):
        yield
        return
    ballot = _Ballot()
    token = _ballot.set(ballot)
    try:
        yield
    except Exception as exc:
        if not ballot.voted:
            agree(exc, label=label, enabled=enabled)  # raises exc here, and on the others their view of it
        raise
    else:
        if not ballot.voted:
            agree(None, label=label, enabled=enabled)
    finally:
        _ballot.reset(token)
