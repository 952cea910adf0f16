"""The demo business every embedded default serves (public id `demo`)."""

from __future__ import annotations

from core.models import Business
from core.types import BusinessId

DEMO_PUBLIC_ID = "demo"

DEMO_BUSINESS = Business(
    business_id=BusinessId("00000000-0000-4000-8000-00000000de70"),
    public_id=DEMO_PUBLIC_ID,
    name="Demo Coffee Roasters",
    info="We roast coffee beans and ship them within two days. Support hours: 9:00-17:00 CET.",
    system_prompt=(
        "You are the friendly assistant of {{ business_name }}. {{ business_info }} "
        "Answer briefly; offer a human agent when you cannot help."
    ),
    response_template="{{ message }}",
    entry_stage="default",
)
