"""vrdma: userspace RDMA para-virtualization over vhost-user."""
