"""The LangGraph agent: plain-language control of the platform (see `graph`)."""
