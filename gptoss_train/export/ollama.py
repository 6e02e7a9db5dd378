"""Ollama Modelfile for an exported gpt-oss GGUF.

Ollama renders prompts with a Go template, not the Jinja chat template inside the GGUF, and it switches its Harmony
parser on only when the model family is gpt-oss **and** the TEMPLATE contains both ``<|start|>`` and ``<|end|>``
(``server/routes.go shouldUseHarmony``, formats.md §5.2). Without it, raw Harmony text (``<|channel|>analysis...``)
leaks into the reply. The template below renders the Harmony format: a system message with the reasoning level
(from Ollama's ``think`` setting), a developer message with instructions and function tools in Harmony's TypeScript-ish
namespace (typed parameters from the tool's JSON schema properties), then the conversation (assistant thinking on the
analysis channel, tool calls on commentary to ``functions.NAME`` with ``<|constrain|>json`` as openai-harmony renders
them, tool results from ``functions.NAME``), ending with ``<|start|>assistant`` for generation. Ollama's template
values used: ``.System``, ``.Tools``, ``.Messages`` (``Role``, ``Content``, ``Thinking``, ``ToolCalls``, ``ToolName``),
``.Think``, ``.ThinkLevel``, ``.IsThinkSet`` and the ``currentDate`` function.
It references ``.Tools`` so Ollama grants the model the tools capability.
"""

from __future__ import annotations

HARMONY_GO_TEMPLATE = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ currentDate }}
{{- if and .IsThinkSet .Think (ne .ThinkLevel "") }}

Reasoning: {{ .ThinkLevel }}
{{- else }}

Reasoning: medium
{{- end }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.
{{- if .Tools }}
Calls to these tools must go to the commentary channel: 'functions'.
{{- end }}<|end|>
{{- if or .System .Tools }}<|start|>developer<|message|>
{{- if .System }}# Instructions

{{ .System }}
{{- end }}
{{- if .Tools }}
{{- if .System }}

{{ end }}# Tools

## functions

namespace functions {
{{- range .Tools }}

// {{ .Function.Description }}
{{- if .Function.Parameters.Properties }}
type {{ .Function.Name }} = (_: {
{{- range $name, $prop := .Function.Parameters.Properties }}
{{- if $prop.Description }}
// {{ $prop.Description }}
{{- end }}
{{ $name }}: {{ range $t, $type := $prop.Type }}{{ if $t }} | {{ end }}{{ $type }}{{ end }},
{{- end }}
}) => any;
{{- else }}
type {{ .Function.Name }} = () => any;
{{- end }}
{{- end }}

} // namespace functions
{{- end }}<|end|>
{{- end }}
{{- range $i, $msg := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $msg.Role "user" }}<|start|>user<|message|>{{ $msg.Content }}<|end|>
{{- else if eq $msg.Role "assistant" }}
{{- if and $last $msg.Thinking }}<|start|>assistant<|channel|>analysis<|message|>{{ $msg.Thinking }}<|end|>
{{- end }}
{{- if $msg.ToolCalls }}
{{- range $msg.ToolCalls }}<|start|>assistant to=functions.{{ .Function.Name }}<|channel|>commentary <|constrain|>json<|message|>{{ .Function.Arguments }}<|call|>
{{- end }}
{{- else if $msg.Content }}<|start|>assistant<|channel|>final<|message|>{{ $msg.Content }}<|end|>
{{- end }}
{{- else if eq $msg.Role "tool" }}<|start|>functions.{{ $msg.ToolName }} to=assistant<|channel|>commentary<|message|>{{ $msg.Content }}<|end|>
{{- end }}
{{- if and $last (ne $msg.Role "assistant") }}<|start|>assistant
{{- end }}
{{- end }}"""

# Sampling defaults OpenAI recommends for gpt-oss (temperature 1.0, top_p 1.0); the context is Ollama's knob.
DEFAULT_PARAMETERS: dict[str, object] = {"temperature": 1.0, "top_p": 1.0, "num_ctx": 8192}


def modelfile_text(gguf_file: str, *, parameters: dict[str, object] | None = None,
                   template: str = HARMONY_GO_TEMPLATE) -> str:
    """The Modelfile: FROM the GGUF, the Harmony TEMPLATE, PARAMETER lines (stop tokens included)."""
    if "<|start|>" not in template or "<|end|>" not in template:
        raise ValueError("the TEMPLATE must contain <|start|> and <|end|> or Ollama will not parse Harmony output")
    if '"""' in template:
        raise ValueError('the TEMPLATE cannot contain """ (it is the Modelfile string delimiter)')
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    for key, value in {**DEFAULT_PARAMETERS, **(parameters or {})}.items():
        lines.append(f"PARAMETER {key} {value}")
    # Stop at the end of a turn; <|end|> only ends a message inside the assistant's turn.
    for stop in ("<|return|>", "<|call|>"):
        lines.append(f"PARAMETER stop {stop}")
    return "\n".join(lines) + "\n"
