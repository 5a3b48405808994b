"""The types both sides of the wire share: messages, plan walking, security."""
