"""From a plan to C text: the Jinja templates rendered, and the C names they use."""
