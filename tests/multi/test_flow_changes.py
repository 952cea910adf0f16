"""A flow edited through one instance's admin API is used at once by every instance."""

from __future__ import annotations

import httpx

from tests.e2e.client import Client, new_widget
from tests.multi.conftest import Cluster
from tests.servers import DEMO_API_KEY


async def test_a_template_changed_on_one_instance_is_used_by_the_others_at_once(cluster: Cluster) -> None:
    a, b = cluster(2, {"CHATGW_SCRIPTED_TOKENS": "8"})
    admin = {"Authorization": f"Bearer {DEMO_API_KEY}"}
    widget = new_widget(b)
    client = await Client.open(b)
    await client.hello(widget)
    # B caches the demo flow while answering.
    await client.send({"type": "message", "client_msg_id": "f-1", "text": "first"})
    first = (await client.until_ai_end())[-1]
    assert first["text"].startswith("You said: first.")

    async with httpx.AsyncClient(base_url=a.http, headers=admin) as http:
        original = (await http.get("/v1/admin/templates/greet")).json()
        changed = await http.patch("/v1/admin/templates/greet", json={"content": "Edited: {{ message }}"})
        assert changed.status_code == 200, changed.text
        try:
            # A new conversation starts in the greeting stage, whose template this is.
            fresh = new_widget(b)
            other = await Client.open(b)
            await other.hello(fresh)
            await other.send({"type": "message", "client_msg_id": "f-2", "text": "second"})
            answer = (await other.until_ai_end())[-1]
            assert answer["text"].startswith("You said: Edited: second.")
            await other.close()
        finally:
            restored = await http.patch("/v1/admin/templates/greet", json={"content": original["content"]})
            assert restored.status_code == 200
    await client.close()
