"""The watch flow against a local hub: the first run records a branch's sha, a moved branch emits the
event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from kiln import events
from tests.fixtures.hub import model_repo_files
from tests.fixtures.prefect import wait_until

REPO = "kiln-test/watched"


async def _events_named(name: str, resource_id: str) -> list[dict]:
    from prefect import get_client

    async with get_client() as client:
        response = await client._client.post(
            "/events/filter",
            json={"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}, "limit": 50},
        )
        response.raise_for_status()
        return response.json()["events"]


def test_watch_records_the_sha_then_emits_revision_changed_when_the_branch_moves(
    prefect_harness, local_hub, tiny_hub_model_dir: Path, tmp_path: Path
):
    from kiln.flows.watch import watch

    first_sha = local_hub.create_repo(REPO, model_repo_files(tiny_hub_model_dir, tiny_hub_model_dir))
    profile = tmp_path / "watched.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "name": "watched",
                "model": {"repo_id": REPO, "revision": "main"},
                "recipes": [{"name": "none"}],
                "targets": [{"name": "cpu", "dtype": "float32"}],
                "registry": {"model_name": "watched"},
            }
        )
    )

    first = watch([str(profile)])[0]
    assert (first["sha"], first["previous"], first["changed"]) == (first_sha, None, False)
    assert watch([str(profile)])[0]["changed"] is False

    new_sha = local_hub.push(REPO, {"README.md": b"# retrained\n"})
    moved = watch([str(profile)])[0]
    assert (moved["sha"], moved["previous"], moved["changed"]) == (new_sha, first_sha, True)

    received = wait_until(
        lambda: asyncio.run(_events_named(events.REVISION_CHANGED, events.RESOURCE_PREFIX + REPO)),
        30,
        "the kiln.model.revision-changed event on the Prefect server",
    )
    assert [e["payload"] for e in received] == [
        {"repo_id": REPO, "revision": new_sha, "profile": str(profile)}
    ]
