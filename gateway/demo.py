"""The demo business every gateway serves (public id `demo`), with a flow that uses every step of
the pipeline: greeting -> collect contact details -> answer questions -> offer a human.

- `greeting` (entry): the first message is answered here; from the second on, `contact`.
- `contact`: asks for an email address. Email and phone are pattern rules valid in every stage (an
  address typed at any time is extracted, at no model cost); the name is an LLM rule of this stage,
  asked of the model through the extraction template. Once an email is known: `questions`.
- `questions`: the model picks the next stage with the selection template, among `questions` and
  `human` (the latter only when the message mentions a human).
- `human`: offers a human agent; the next message goes back to `questions`.

Ids are fixed, so seeding is idempotent and every instance seeds the same flow.
"""

from __future__ import annotations

from core.flow_models import (
    ExtractionRule,
    ExtractorKind,
    FieldType,
    Flow,
    Stage,
    Template,
    TemplateType,
    Transition,
)
from core.models import Business
from core.types import BusinessId

DEMO_PUBLIC_ID = "demo"
_BID = BusinessId("00000000-0000-4000-8000-00000000de70")

DEMO_BUSINESS = Business(
    business_id=_BID,
    public_id=DEMO_PUBLIC_ID,
    name="Demo Coffee Roasters",
    info="We roast coffee beans and ship them within two days. Support hours: 9:00-17:00 CET.",
    system_prompt=(
        "You are the friendly assistant of {{ business_name }}. {{ business_info }} "
        "Answer briefly; offer a human agent when you cannot help."
    ),
    response_template="{{ message }}",
    entry_stage="greeting",
    allowed_origins=("self",),  # its own pages: the gateway's demo page and console, on any host
)


def _id(n: int) -> str:
    return f"00000000-0000-4000-8000-0000000d{n:04d}"


_PERSONA = "You are the friendly assistant of {{ business_name }}. {{ business_info }} "


def _response(n: int, name: str, task: str) -> Template:
    return Template(_id(n), _BID, name, TemplateType.RESPONSE_GENERATION, "{{ message }}", _PERSONA + task)


_GREET = _response(1, "greet", "Greet the customer and ask how you can help.")
_CONTACT = _response(2, "ask-contact", "Ask for an email address so that we can follow up.")
_ANSWER = _response(
    3, "answer", "Answer questions about orders and shipping. What we know: {{ extracted | tojson }}."
)
_HUMAN = _response(4, "offer-human", "Offer to connect the customer with a human agent.")
_EXTRACT = Template(
    _id(5),
    _BID,
    "extract-contact",
    TemplateType.DATA_EXTRACTION,
    "From the customer's message, extract: {{ fields | join(', ') }}.\nMessage: {{ message }}",
    "You extract customer details. Use null for anything the message does not say.",
    variables=("fields", "message"),
)
_SELECT = Template(
    _id(6),
    _BID,
    "pick-stage",
    TemplateType.STAGE_SELECTION,
    "The customer wrote: {{ message }}\nWhich stage should the conversation be in now?",
    "You route a customer conversation of {{ business_name }}.",
)

_GREETING = Stage(
    _id(11), _BID, "greeting", "Say hello", is_entry=True, response_template_id=_GREET.template_id
)
_CONTACT_STAGE = Stage(
    _id(12),
    _BID,
    "contact",
    "Collect contact details",
    extraction_template_id=_EXTRACT.template_id,
    response_template_id=_CONTACT.template_id,
)
_QUESTIONS = Stage(
    _id(13),
    _BID,
    "questions",
    "Answer questions",
    selection_template_id=_SELECT.template_id,
    response_template_id=_ANSWER.template_id,
)
_HUMAN_STAGE = Stage(_id(14), _BID, "human", "Offer a human", response_template_id=_HUMAN.template_id)

DEMO_FLOW = Flow(
    business_id=_BID,
    templates=(_GREET, _CONTACT, _ANSWER, _HUMAN, _EXTRACT, _SELECT),
    stages=(_GREETING, _CONTACT_STAGE, _QUESTIONS, _HUMAN_STAGE),
    transitions=(
        Transition(_id(21), _BID, _GREETING.stage_id, _CONTACT_STAGE.stage_id, "turns > 1"),
        Transition(_id(22), _BID, _CONTACT_STAGE.stage_id, _QUESTIONS.stage_id, "has(data.email)"),
        Transition(_id(23), _BID, _QUESTIONS.stage_id, _HUMAN_STAGE.stage_id, 'message.contains("human")'),
        Transition(_id(24), _BID, _HUMAN_STAGE.stage_id, _QUESTIONS.stage_id),
    ),
    rules=(
        ExtractionRule(_id(31), _BID, "email", ExtractorKind.PATTERN, FieldType.EMAIL),
        ExtractionRule(_id(32), _BID, "phone", ExtractorKind.PATTERN, FieldType.PHONE),
        ExtractionRule(_id(33), _BID, "name", ExtractorKind.LLM, FieldType.TEXT, _CONTACT_STAGE.stage_id),
    ),
)
