"""An independent reader of AUTOMATIC1111's ``parameters`` text, written from A1111's own
``parse_generation_parameters`` (modules/infotext_utils.py): the last line holds the settings
when its ``Key: value`` regex matches at least three times; lines before ``Negative prompt:``
are the prompt; quoted values are JSON strings."""
import json
import re

SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param


def parse(text: str) -> dict:
    lines = text.strip().split("\n")
    settings = {}
    if len(SETTING.findall(lines[-1])) >= 3:
        settings = {key: json.loads(value) if value[:1] == '"' == value[-1:] else value
                    for key, value in SETTING.findall(lines.pop())}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}
