"""The sidecar's config schema: the frozen dataclasses a config file builds into.

Field comments say what each key means; the value rules the types cannot express
are in `rules`, the checks across fields in `checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sidecar.config.authz import AuthorizationConfig
from sidecar.config.routerules import FilterSpec, RouteRule

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
AppProtocol = Literal["http1", "h2c"]
UpstreamProtocol = Literal["h2c", "http1"]
LbPolicy = Literal["round_robin", "least_request", "ring_hash"]
DiscoveryBackend = Literal["file", "static", "consul", "nacos", "kubernetes"]
TlsMode = Literal["disable", "permissive", "strict"]
TlsSource = Literal["file", "dev", "vault", "consul"]
TlsVersion = Literal["1.2", "1.3"]


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The local app's identity in the mesh."""

    name: str = "app"
    instance_id: str = ""  # empty: "{name}-{hostname}-{pid}"
    zone: str = ""
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppConfig:
    """Where the inbound listener hands calls to the local app."""

    host: str = "127.0.0.1"
    port: int = 8000
    protocol: AppProtocol = "http1"
    health_path: str = "/health"
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class CaptureListenerConfig:
    """Where iptables REDIRECTs the app's outbound TCP (docs/transparent.md)."""

    # REDIRECT rewrites the destination to 127.0.0.1 for the pod's own traffic and to the
    # incoming interface's address otherwise, so this binds every address; off by default.
    host: str = "0.0.0.0"
    port: int = 15001
    enabled: bool = False


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    outbound: ListenerConfig = ListenerConfig("127.0.0.1", 8080)
    inbound: ListenerConfig = ListenerConfig("0.0.0.0", 15006)
    admin: ListenerConfig = ListenerConfig("0.0.0.0", 9090)
    capture: CaptureListenerConfig = CaptureListenerConfig()
    # The address other sidecars use to reach this sidecar's inbound listener.
    # Empty: the inbound host when it is a concrete address, else 127.0.0.1.
    advertise_host: str = ""


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    host: str
    port: int
    zone: str = ""
    weight: int = 1
    meta: dict[str, str] = field(default_factory=dict)  # for subsets (docs/traffic.md)


@dataclass(frozen=True, slots=True)
class FileDiscoveryConfig:
    directory: str = ""  # empty: "$TMPDIR/opus-mesh/registry"
    heartbeat_interval: float = 0.25
    ttl: float = 1.0
    poll_interval: float = 0.2


@dataclass(frozen=True, slots=True)
class StaticDiscoveryConfig:
    services: dict[str, tuple[StaticEndpoint, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsulDiscoveryConfig:
    """Consul through its HTTP API (docs/discovery.md)."""

    address: str = ""  # empty: $CONSUL_HTTP_ADDR, else http://127.0.0.1:8500
    token: str = ""  # empty: $CONSUL_HTTP_TOKEN, if set
    datacenters: dict[str, str] = field(default_factory=dict)  # service -> its dc
    # Tried in order when a service's own dc has no passing instance.
    failover_datacenters: tuple[str, ...] = ()
    # Watched from start (start() waits for them); others are watched on first use.
    watch: tuple[str, ...] = ()
    wait: float = 30.0  # blocking-query wait, seconds
    max_queries_per_second: float = 10.0  # per watch; the loop's token bucket (burst 2)
    retry_max: float = 2.0  # longest back-off between failed queries, seconds
    request_timeout: float = 2.0  # non-blocking calls (register, check updates)
    ttl: float = 3.0  # the registered TTL check's TTL
    check_interval: float = 1.0  # probe the app and refresh the TTL check this often
    check_timeout: float = 0.5  # the app probe's timeout
    deregister_critical_after: float = 60.0  # Consul's minimum is 1 minute


@dataclass(frozen=True, slots=True)
class NacosDiscoveryConfig:
    """Nacos through its v2 HTTP Open API, falling back to v1 (docs/discovery.md)."""

    address: str = ""  # empty: $NACOS_ADDR, else http://127.0.0.1:8848
    namespace: str = ""  # namespaceId; empty: the public namespace
    group: str = "DEFAULT_GROUP"
    cluster: str = "DEFAULT"
    api: Literal["auto", "v2", "v1"] = "auto"  # auto: v2, then v1 on a 404
    beat_interval: float = 5.0
    poll_interval: float = 1.0
    watch: tuple[str, ...] = ()
    request_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Headless Services through cluster DNS (docs/discovery.md)."""

    namespace: str = ""  # empty: the pod's namespace (service account file), else "default"
    cluster_domain: str = "cluster.local"
    port: int = 15006  # the peers' inbound port (every sidecar listens on the same one)
    resolve_interval: float = 1.0
    resolve_timeout: float = 1.0
    watch: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    backend: DiscoveryBackend = "file"
    register: bool = True  # register the local app as an instance of service.name
    file: FileDiscoveryConfig = FileDiscoveryConfig()
    static: StaticDiscoveryConfig = StaticDiscoveryConfig()
    consul: ConsulDiscoveryConfig = ConsulDiscoveryConfig()
    nacos: NacosDiscoveryConfig = NacosDiscoveryConfig()
    kubernetes: KubernetesDiscoveryConfig = KubernetesDiscoveryConfig()


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checks: GET `path` on every endpoint (a peer's inbound, so its app)."""

    enabled: bool = False
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 1  # consecutive passes to return to rotation
    unhealthy_threshold: int = 2  # consecutive failures to leave it


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive outlier detection on the calls the cluster sends (Envoy's semantics)."""

    enabled: bool = True
    consecutive_5xx: int = 5  # 5xx replies or connect failures in a row
    consecutive_connect_failures: int = 3  # connect failures alone in a row
    base_ejection_time: float = 30.0  # x times ejected
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Sidecar-to-sidecar transport (the seed's connection-pool table)."""

    protocol: UpstreamProtocol = "h2c"
    max_connections: int = 20
    max_per_route: int = 5
    idle_timeout: float = 30.0
    connect_timeout: float = 1.0
    # How long a call waits for a free stream slot when every allowed connection is full.
    pending_timeout: float = 1.0
    # HTTP/2 PING on a connection quiet this long; no ACK within keepalive_timeout:
    # the peer is dead, the connection is dropped and replaced. 0 turns it off.
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 5.0
    lb_policy: LbPolicy = "round_robin"
    hash_header: str = ""  # ring_hash: the header whose value picks the endpoint
    zone_aware: bool = True  # prefer healthy endpoints in service.zone
    health_check: HealthCheckConfig = HealthCheckConfig()
    outlier: OutlierConfig = OutlierConfig()


@dataclass(frozen=True, slots=True)
class FiltersConfig:
    """Filter chains per listener; calls pass them in order, responses in reverse."""

    outbound: tuple[FilterSpec, ...] = ()
    inbound: tuple[FilterSpec, ...] = ()
    # The most a filter may buffer of a body it asks to read whole; over it: 413.
    max_body_bytes: int = 1024 * 1024
    # The most request body bytes all calls together hold buffered (per process); over: 503.
    max_buffered_request_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ClusterOverride:
    """Per-service overrides of the upstream defaults."""

    lb_policy: LbPolicy | None = None
    hash_header: str | None = None
    max_connections: int | None = None
    max_per_route: int | None = None
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig | None = None
    # Replaces filters.outbound for calls to this service.
    filters: tuple[FilterSpec, ...] | None = None
    # Named sets of this service's endpoints by metadata (`v2: {version: v2}`), for
    # route rules' destinations and mirrors (docs/traffic.md).
    subsets: dict[str, dict[str, str]] = field(default_factory=dict)
    # Calls resolved to this service: first matching rule wins (docs/traffic.md).
    route_rules: tuple[RouteRule, ...] = ()
    # mTLS: the SPIFFE ID this service's sidecars must present (secure naming); unset:
    # what the registry entry's metadata names, else spiffe://<tls.trust_domain>/svc/<name>.
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """An explicit outbound route: a path prefix or a gRPC service name to a service."""

    service: str
    prefix: str = ""
    grpc_service: str = ""
    # Replaces the service's (or the listener's) outbound chain for calls on this route.
    filters: tuple[FilterSpec, ...] | None = None


@dataclass(frozen=True, slots=True)
class Http2ServerConfig:
    max_concurrent_streams: int = 100
    initial_window_size: int = 65535
    max_frame_size: int = 16384


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_request_line: int = 8192
    max_header_bytes: int = 65536
    # HTTP/1.1: from a request's first byte to the end of its head (nginx client_header_timeout).
    header_read_timeout: float = 10.0
    # From accept until the protocol is known and, for HTTP/2, the client's preface and
    # SETTINGS are in (Envoy's listener_filters_timeout: 15 s).
    preface_timeout: float = 10.0
    # A connection with no call in progress (HTTP/1.1 keep-alive, HTTP/2 with no open
    # stream) is closed after this long; HTTP/2 gets a GOAWAY first (nginx: 75 s).
    idle_timeout: float = 60.0
    # Longest wait for the next byte of a request body we are reading (nginx
    # client_body_timeout: 60 s); then the call is abandoned and the connection closed.
    body_read_timeout: float = 30.0
    # Open downstream connections per listener; beyond it a new one is closed at once.
    max_connections: int = 10000
    # File descriptors kept back from downstream connections for everything else (pooled
    # upstream connections, admin, the registry heartbeat, logs): accepting stops while
    # open downstream connections + fds open at start + this reach RLIMIT_NOFILE.
    fd_reserve: int = 128


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Transparent interception on listeners.capture (docs/transparent.md)."""

    # How long a connection may stay silent before it is relayed unsniffed: server-first
    # protocols (MySQL, SMTP) send nothing until the server speaks. Linkerd waits 10 s.
    detect_timeout: float = 0.2
    # Relayed at once, never sniffed (Linkerd's default opaque ports).
    opaque_ports: tuple[int, ...] = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)
    # Original destination ("ip:port" or "ip") -> the service it stands for (a VIP, say).
    service_ips: dict[str, str] = field(default_factory=dict)
    connect_timeout: float = 1.0  # passthrough: dialling the original destination


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = "INFO"
    # "-": stdout; "": off; anything else: a file path (appended).
    access_log: str = "-"


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    """Live configuration (docs/config-reload.md): SIGHUP and POST /config/reload always
    re-read the file; `watch` also re-reads it when it changes."""

    # Poll the file's stat (following symlinks, so a Kubernetes ConfigMap's `..data`
    # swap is seen) every poll_interval seconds.
    watch: bool = True
    poll_interval: float = 0.5


@dataclass(frozen=True, slots=True)
class TlsFileConfig:
    """PEM files another tool keeps current (cert-manager, a Secret volume, SPIRE, Vault Agent)."""

    cert: str = ""  # the certificate chain, leaf first
    key: str = ""  # the leaf's private key (unencrypted PEM)
    bundle: str = ""  # the trust bundle: the CA certificates peers' chains must lead to
    poll_interval: float = 1.0  # how often the files are looked at for a change


@dataclass(frozen=True, slots=True)
class TlsDevConfig:
    """The built-in CA made by `opus-sidecar ca init <dir>`."""

    ca_dir: str = ""
    ttl: float = 3600.0  # the leaf's lifetime, seconds; renewed at 2/3 of it


@dataclass(frozen=True, slots=True)
class TlsConsulConfig:
    """Consul service mesh's CA through the local agent (docs/security.md, "consul")."""

    # The agent: "host:port" or a URL (http/https); empty: $CONSUL_HTTP_ADDR, else 127.0.0.1:8500.
    address: str = ""
    token: str = ""  # an ACL token with service:write on `service` (X-Consul-Token)
    service: str = ""  # whose leaf is asked for; empty: service.name
    # The datacenter and namespace in the identities Consul issues; empty: the agent's
    # datacenter (read from the leaf) and Consul's "default" namespace.
    datacenter: str = ""
    namespace: str = ""
    wait: float = 300.0  # a blocking query's wait (Consul caps it at 10 minutes)
    request_timeout: float = 10.0  # beyond the wait, for an answer to arrive
    retry_max: float = 30.0  # the back-off after failed queries doubles up to this
    # Each watch's query rate, whatever the agent answers (Consul's advice for blocking
    # queries: an index that keeps resetting must not become a busy loop); burst 2.
    max_queries_per_second: float = 10.0
    # At start, how long the first roots and leaf are waited for before giving up.
    start_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class TlsVaultConfig:
    """Vault's PKI secrets engine: `POST /v1/<mount>/issue/<role>` (docs/security.md)."""

    address: str = ""  # http(s)://host:port of Vault
    mount: str = "pki"  # where the PKI secrets engine is mounted
    role: str = ""  # the PKI role issuing the leaves (its allowed_uri_sans must allow the ID)
    token: str = ""  # a Vault token; or token_file (re-read at each issue)
    token_file: str = ""
    common_name: str = ""  # empty: service.name
    ttl: float = 3600.0  # the leaf's lifetime asked for, seconds; renewed at 2/3 of it
    ca_file: str = ""  # PEM CA to verify an https Vault with; empty: the system's CAs
    timeout: float = 5.0  # each request to Vault, seconds
    retry_max: float = 30.0  # longest back-off between failed issues, seconds


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS between sidecars with SPIFFE identities (docs/security.md)."""

    # disable: plaintext as before; permissive: the inbound port takes TLS and plaintext
    # (told apart by the first byte), outbound calls use TLS; strict: mTLS only.
    mode: TlsMode = "disable"
    trust_domain: str = ""
    source: TlsSource = "file"
    # The SPIFFE ID the dev and vault sources issue this sidecar; empty: spiffe://<td>/svc/<service.name>.
    identity: str = ""
    min_version: TlsVersion = "1.3"
    # From accept (or connect) until the handshake is done; then the connection is closed.
    handshake_timeout: float = 5.0
    file: TlsFileConfig = TlsFileConfig()
    dev: TlsDevConfig = TlsDevConfig()
    consul: TlsConsulConfig = TlsConsulConfig()
    vault: TlsVaultConfig = TlsVaultConfig()


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    service: ServiceConfig = ServiceConfig()
    app: AppConfig = AppConfig()
    listeners: ListenersConfig = ListenersConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    services: dict[str, ClusterOverride] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    # The outbound listener's route rules, tried on every call before the service's own.
    route_rules: tuple[RouteRule, ...] = ()
    filters: FiltersConfig = FiltersConfig()
    http2: Http2ServerConfig = Http2ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    drain_timeout: float = 10.0
    # Worker processes, each with its own event loop, sharing the listeners' ports
    # through SO_REUSEPORT; a supervisor serves the admin port with metrics summed.
    workers: int = 1
    capture: CaptureConfig = CaptureConfig()
    reload: ReloadConfig = ReloadConfig()
    tls: TlsConfig = TlsConfig()
    # Inbound calls' authorization rules (docs/security.md).
    authorization: AuthorizationConfig = field(default_factory=AuthorizationConfig)
