"""Network namespaces: discovery (which exist), naming (what to call them, who lives there) and
entering (running a poll inside one). Callers use this package's names; the modules split the work.
"""

from tcpwatch.sources.netns.discovery import NetnsTarget, discover, select
from tcpwatch.sources.netns.entering import NetnsGone, run_inside
from tcpwatch.sources.netns.naming import (
    INODE_PREFIX,
    NET_NS_INIT_INO,
    RUN_NETNS_DIR,
    NetnsNames,
    container_in_cgroup,
    current_netns_inode,
    inode_name,
    ip_netns_name,
    name_rank,
    netns_name,
    own_netns_name,
    pod_namespace_from_resolv_conf,
    read_inside_root,
)

__all__ = [
    "INODE_PREFIX",
    "NET_NS_INIT_INO",
    "RUN_NETNS_DIR",
    "NetnsGone",
    "NetnsNames",
    "NetnsTarget",
    "container_in_cgroup",
    "current_netns_inode",
    "discover",
    "inode_name",
    "ip_netns_name",
    "name_rank",
    "netns_name",
    "own_netns_name",
    "pod_namespace_from_resolv_conf",
    "read_inside_root",
    "run_inside",
    "select",
]
