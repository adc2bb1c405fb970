"""The history features of instances sent without them: looked up in the online store, derived, reported.

For each such instance the entity's stored state (``ctloop.online_store``) gives the derived features through
``ctloop.history.features``, the definition the transform job's values are tested against; an entity the store
does not know gets first-event features, as its first event got in training. Each answer says what was looked
up: ``{"entityId", "known", "eventTime", "values": {feature: value}, "latestEventTime", "asOf", "ageSeconds"}``,
``asOf`` being the end of the data the stored state was folded from and ``ageSeconds`` how long ago that was.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

from ctloop.history import HistoryOrderError, features, iso, to_micros
from ctloop.online_store import OnlineStore
from serving.model import InstanceError, InstanceValidator, Parsed


async def fill_history(parsed: Parsed, rows: int, validator: InstanceValidator, store: OnlineStore | None,
                       ) -> list[dict[str, Any] | None]:
    """Fill the derived columns of ``parsed.lookups`` in place; returns each instance's lookup report (None
    for instances that sent their history features). Raises InstanceError naming the instance and field."""
    reports: list[dict[str, Any] | None] = [None] * rows
    if not parsed.lookups:
        return reports
    if store is None:
        first = parsed.lookups[0]
        raise InstanceError(f"instances[{first.index}]: this server has no online store to look up the history of "
                            f"{validator.id_field}={first.entity!r}; send the history features "
                            f"{list(validator.derived)} with the instance")
    ids = [lk.entity for lk in parsed.lookups]
    stored = await asyncio.to_thread(store.read, ids) if store.blocking else store.read(ids)
    spec = validator.spec
    assert spec is not None  # lookups exist only for models with history features
    now = time.time()
    for lk in parsed.lookups:
        found = stored.get(lk.entity)
        try:
            values = features(found.state if found else None, lk.ts_us, spec)
        except HistoryOrderError as exc:
            raise InstanceError(f"instances[{lk.index}].{validator.ts_field}: {exc}") from None
        except KeyError as exc:
            raise InstanceError(f"instances[{lk.index}].{validator.id_field}: the online store's state does not "
                                f"match the model: {exc.args[0]}") from None
        for name, value in values.items():
            parsed.columns[name][lk.index] = value
        reports[lk.index] = {
            "entityId": lk.entity,
            "known": found is not None,
            "eventTime": iso(lk.ts_us),
            "values": values,
            "latestEventTime": iso(found.state.last_us) if found else None,
            "asOf": found.as_of if found else None,
            "ageSeconds": _age(found.as_of, now) if found else None,
        }
    return reports


def _age(as_of: str, now: float) -> float | None:
    try:
        return round(now - to_micros(datetime.fromisoformat(as_of)) / 1e6, 3)
    except ValueError:
        return None
