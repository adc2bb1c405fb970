"""Traffic-split arithmetic shared by every registry: the same rules as the aiplatform SDK.

A split maps deployed-model ids to whole percentages that sum to 100 (or is empty).
"""

from collections.abc import Mapping
from typing import Any

from ctloop.registry.base import RegistryError


def allocate_traffic(split: Mapping[str, int], new_id: str, percent: int) -> dict[str, int]:
    """The new deployment gets ``percent``; the rest is shared in proportion to the current split.

    Same arithmetic as ``aiplatform.Endpoint._allocate_traffic``: truncate, then hand the leftover points out
    one at a time in order, so the total is exactly 100.
    """
    check_percent(percent, "traffic_percent")
    remaining = 100 - percent
    if remaining and sum(split.values()) == 0:
        # Nobody serves traffic yet, so nobody can take the other share (the SDK raises here too).
        raise RegistryError(
            f"cannot deploy with traffic_percent={percent}: the endpoint has no model serving traffic "
            f"to take the other {remaining}%; deploy with 100"
        )
    new = {k: int(v / 100 * remaining) for k, v in split.items()}
    _hand_out(new, remaining - sum(new.values()))
    new[new_id] = percent
    return new


def unallocate_traffic(split: Mapping[str, int], removed_id: str) -> dict[str, int]:
    """Remove ``removed_id`` and scale the others back up to 100 (``Endpoint._unallocate_traffic``).

    If every remaining deployment had 0%, the most recently deployed one (last in ``split``) takes 100%: that
    is the model that served before the removed one, which makes an undeploy a rollback.
    """
    rest = {k: v for k, v in split.items() if k != removed_id}
    if not rest:
        return {}
    left = 100 - split.get(removed_id, 0)
    if left == 0:
        last = list(rest)[-1]
        return {k: (100 if k == last else 0) for k in rest}
    new = {k: int(v / left * 100) for k, v in rest.items()}
    _hand_out(new, 100 - sum(new.values()))
    return new


def _hand_out(split: dict[str, int], points: int) -> None:
    for key in split:
        if points <= 0:
            break
        split[key] += 1
        points -= 1


def check_percent(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise RegistryError(f"{what}: expected an integer 0..100, found {value!r}")
    return value
