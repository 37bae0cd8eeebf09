"""Tools of the execution module (offline by default); `build_registry` picks a domain's set."""
