-- Migrations only expand (new tables, new nullable columns), so the previous release keeps running
-- against a migrated database.
CREATE TABLE server_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE nodes (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    name            TEXT NOT NULL,
    overlay_addr    TEXT NOT NULL UNIQUE,
    public_key      TEXT,
    secret_hash     TEXT NOT NULL,
    generation      BIGINT NOT NULL,
    join_expires_ms BIGINT NOT NULL,
    join_once       BIGINT NOT NULL,
    join_used       BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL,
    last_seen_ms    BIGINT NOT NULL,
    version         TEXT NOT NULL,
    UNIQUE (kind, name)
);

CREATE TABLE resources (
    name         TEXT PRIMARY KEY,
    site_id      TEXT NOT NULL REFERENCES nodes (id),
    target       TEXT NOT NULL,
    alias        TEXT UNIQUE,
    overlay_addr TEXT NOT NULL UNIQUE,
    created_ms   BIGINT NOT NULL
);

CREATE TABLE grants (
    client_id     TEXT NOT NULL REFERENCES nodes (id),
    resource_name TEXT NOT NULL REFERENCES resources (name),
    created_ms    BIGINT NOT NULL,
    PRIMARY KEY (client_id, resource_name)
);

CREATE TABLE released_addresses (
    addr        TEXT PRIMARY KEY,
    released_ms BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    source  TEXT NOT NULL,
    outcome TEXT NOT NULL
);
