"""Phone-agent data: the split names and the project's own system prompt, shared by the generator (``synth``), the
reader (``phone``) and the export runner; kept here, free of heavy imports."""

SPLITS = ("train", "val", "test")
# The project's own short system prompt (synthetic data, the export runner's default); not Open-AutoGLM's.
SYSTEM_PROMPT = (
    "You operate a phone. Reply <think>why</think><answer>ACTION</answer>; ACTION is "
    "do(action=Tap|Long Press|Double Tap|Type|Swipe|Launch|Back|Home|Wait|Take_over, ...) or finish(message=...)."
)
