"""The bus: mail between agents and the operator, and topics (the embedded backend)."""
