"""Who may see which model. One SQL predicate, used by every read of the catalog.

- admin (role admin, or the admin token): everything
- developer: public models and their own
- platform: public models and those granted to them, from permitted_from_ts until permitted_until_ts
What a caller may not see answers 404, so existence does not leak.
"""

from __future__ import annotations

import time

from registry_api.auth import Principal

VISIBLE = """(
    %(see_all)s
    or m.visibility = 'public'
    or m.owner_id = %(uid)s
    or exists (
        select 1 from grants g
        where g.model_id = m.id and g.platform_user_id = %(uid)s and g.revoked_ts is null
          and g.permitted_from_ts <= %(now)s
          and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)
    )
)"""


def visibility_params(principal: Principal) -> dict[str, object]:
    """Parameters of VISIBLE for this caller, at this instant."""
    return {"see_all": principal.sees_everything, "uid": principal.user_id, "now": int(time.time())}
