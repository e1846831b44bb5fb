"""Sessions: the Session, the SessionStore protocol and its two stores, the snapshot codec, the manager."""
