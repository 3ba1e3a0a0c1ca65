"""The bus's own security: DIN's CA (``tls``), NATS operator/accounts/users and their permissions
(``nats_auth``, ``permissions``), Kafka SCRAM users and ACLs (``kafka``), all under one folder per deployment
(``<keys>/bus``) with secrets 0600 (``files``)."""
