"""Build-triggering events: their shape, their validation, and `kiln emit`'s refusal without a server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kiln import events
from kiln.cli import app
from kiln.errors import KilnInputError


def test_short_and_full_event_names_give_the_documented_shape():
    event = events.model_event("revision-changed", "org/model", "abc123", "profiles/x.yaml")
    assert event.event == "kiln.model.revision-changed"
    assert event.resource == {"prefect.resource.id": "kiln.model.org/model", "kiln.repo-id": "org/model"}
    assert event.payload == {"repo_id": "org/model", "revision": "abc123", "profile": "profiles/x.yaml"}
    assert (
        events.model_event("kiln.retraining.completed", "org/model", "v2").event
        == events.RETRAINING_COMPLETED
    )


@pytest.mark.parametrize(
    ("name", "repo", "revision", "message"),
    [
        ("model-updated", "org/m", "abc", "allowed: revision-changed, retraining-completed"),
        ("revision-changed", " ", "abc", "repo_id is empty"),
        ("retraining-completed", "org/m", "", "revision is empty"),
    ],
)
def test_bad_events_are_refused_naming_what_is_allowed(name, repo, revision, message):
    with pytest.raises(KilnInputError, match=message):
        events.model_event(name, repo, revision)


def test_kiln_emit_without_a_server_exits_2_and_says_how_to_point_at_one(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # an earlier test's Prefect harness may still point this process at its server: clear that too
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(
            app, ["emit", "revision-changed", "--repo-id", "org/m", "--revision", "abc"]
        )
    assert result.exit_code == 2
    assert "PREFECT_API_URL" in result.output
