"""The local runtime: the stack from template.yaml on moto server, the handlers run as Lambda runs them."""
