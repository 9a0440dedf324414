"""Every panel of the provisioned Grafana dashboard runs against the analytics store and returns rows.

The store is the in-process ClickHouse engine (chDB) with the service's own DDL and events loaded the way
the loader loads them; Grafana's macros are replaced with concrete values of a time range.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import yaml

from registry_analytics.batching import new_token
from registry_analytics.store import Store
from registry_shared.events import FileAccessed, encode_event, make_event
from registry_shared.settings import ClickHouseSettings

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "registry-usage.json"

#: What each panel must answer with (its column names, in order).
EXPECTED_COLUMNS = {
    "Events in range": ["events", "downloads", "users", "models"],
    "Downloads and events over time": ["time", "events", "downloads"],
    "Events by kind": ["kind", "events"],
    "Top models (downloads)": ["repo_id", "downloads", "events", "users"],
    "Top users": ["user_id", "email", "name", "events", "downloads", "last_seen"],
    "Ingest lag (access time → stored)": ["time", "avg_lag_s", "max_lag_s"],
    "Since last ingest": ["seconds_since_last_ingest", "stored_events"],
}


def render(sql: str, start: int, end: int, interval: int = 3600) -> str:
    """Replace the ClickHouse datasource's macros as Grafana does for the range [start, end]."""
    sql = re.sub(
        r"\$__timeFilter\((\w+(?:\.\w+)?)\)",
        lambda m: f"{m[1]} >= toDateTime({start}) AND {m[1]} <= toDateTime({end})",
        sql,
    )
    sql = re.sub(
        r"\$__timeInterval\((\w+(?:\.\w+)?)\)",
        lambda m: f"toStartOfInterval({m[1]}, INTERVAL {interval} second)",
        sql,
    )
    sql = sql.replace("$__fromTime", f"toDateTime({start})").replace("$__toTime", f"toDateTime({end})")
    assert "$" not in sql, f"unreplaced macro in {sql}"
    return sql


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store(ClickHouseSettings(clickhouse_mode="chdb", chdb_path=str(tmp_path_factory.mktemp("grafana") / "chdb")))
    st.migrate()
    now = time.time()
    values = []
    kinds = ["download", "manifest", "files_list", "platform_manifest", "model_detail", "changes"]
    for i in range(300):
        data = FileAccessed(user_id=i % 7, kind=kinds[i % 6], repo_id=f"org/m{i % 5}", ts=now - i * 1800)
        values.append(encode_event(make_event(data, source="/test", id=str(uuid.uuid4()))))
    st.load_values(values, new_token())
    st.insert_users([(u, f"user{u}@example.com", f"User {u}", "platform", int(now * 1000)) for u in range(7)])
    yield st
    st.close()


def test_provisioning_points_at_the_compose_clickhouse():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "grafana-clickhouse-datasource"
    assert source["jsonData"]["host"] == "clickhouse"
    assert (source["jsonData"]["protocol"], source["jsonData"]["port"]) in {("native", 9000), ("http", 8123)}
    assert source["jsonData"]["defaultDatabase"] == "registry"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "clickhouse" in compose["services"]
    assert any("grafana-clickhouse-datasource" in v for v in compose["services"]["grafana"]["environment"].values())

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "registry.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts

    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["title"] for p in dashboard["panels"]} == set(EXPECTED_COLUMNS)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"]


@pytest.mark.parametrize("title", sorted(EXPECTED_COLUMNS))
def test_panel_sql_runs_and_returns_rows(store, title):
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
    assert panel["targets"], title
    end = int(time.time()) + 60
    start = end - 7 * 86_400
    for target in panel["targets"]:
        result = store.client.query(render(target["rawSql"], start, end))
        assert list(result.column_names) == EXPECTED_COLUMNS[title], title
        assert result.result_rows, f"{title}: no rows"
        if title == "Events in range":
            events, downloads, users, models = result.result_rows[0]
            in_range = [i for i in range(300) if i * 1800 < 7 * 86_400 - 60]
            assert events == len(in_range) and users == 7 and models == 5
            assert downloads == sum(1 for i in in_range if i % 6 == 0)
        if title == "Top users":
            assert all(email.endswith("@example.com") for _, email, *_ in result.result_rows)
        if title == "Events by kind":
            assert {k for k, _ in result.result_rows} == {
                "download",
                "manifest",
                "files_list",
                "platform_manifest",
                "model_detail",
                "changes",
            }
