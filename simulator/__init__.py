"""A pytest plugin and command line that build trees of hosts and run context trees through them."""
