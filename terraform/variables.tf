variable "cluster_name" {
  description = "Name of the Kind cluster (and of its kubeconfig context, kind-<name>)."
  type        = string
  default     = "oppen"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$", var.cluster_name))
    error_message = "cluster_name must be 1-32 lowercase letters, digits or '-', starting and ending alphanumeric."
  }
}

variable "kubernetes_version" {
  description = "Kubernetes version of the Kind node image (kindest/node:<version>); CI validates manifests against it."
  type        = string
  default     = "v1.34.0"

  validation {
    condition     = can(regex("^v1\\.[0-9]+\\.[0-9]+$", var.kubernetes_version))
    error_message = "kubernetes_version must look like v1.34.0."
  }
}

variable "cpu_nodes" {
  description = "Kind worker nodes for the CPU worker group and the platform's services."
  type        = number
  default     = 2

  validation {
    condition     = var.cpu_nodes >= 1 && var.cpu_nodes <= 8 && floor(var.cpu_nodes) == var.cpu_nodes
    error_message = "cpu_nodes must be a whole number from 1 to 8."
  }
}

variable "gpu_nodes" {
  description = "Kind worker nodes that get the host's GPUs (needs the NVIDIA container toolkit; see README)."
  type        = number
  default     = 0

  validation {
    condition     = var.gpu_nodes >= 0 && var.gpu_nodes <= 4 && floor(var.gpu_nodes) == var.gpu_nodes
    error_message = "gpu_nodes must be a whole number from 0 to 4."
  }
}

variable "cpu_worker_max" {
  description = "Most pods the autoscaler runs in the RayCluster's CPU worker group."
  type        = number
  default     = 4

  validation {
    condition     = var.cpu_worker_max >= 1 && var.cpu_worker_max <= 32
    error_message = "cpu_worker_max must be from 1 to 32."
  }
}

variable "gpu_worker_max" {
  description = "Most pods (one GPU each) in the RayCluster's GPU worker group; its minimum is 0."
  type        = number
  default     = 2

  validation {
    condition     = var.gpu_worker_max >= 0 && var.gpu_worker_max <= 16
    error_message = "gpu_worker_max must be from 0 to 16."
  }
}

variable "kuberay_operator_version" {
  description = "Helm chart version of the KubeRay operator; its CRDs are the ones CI validates against."
  type        = string
  default     = "1.7.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.kuberay_operator_version))
    error_message = "kuberay_operator_version must be an exact version like 1.7.0, never a range."
  }
}

variable "kube_prometheus_stack_version" {
  description = "Helm chart version of kube-prometheus-stack (Prometheus, Grafana, the operator)."
  type        = string
  default     = "70.6.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.kube_prometheus_stack_version))
    error_message = "kube_prometheus_stack_version must be an exact version like 70.6.0."
  }
}

variable "nvidia_device_plugin_version" {
  description = "Helm chart version of the NVIDIA device plugin, installed only when gpu_nodes > 0."
  type        = string
  default     = "0.17.1"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.nvidia_device_plugin_version))
    error_message = "nvidia_device_plugin_version must be an exact version like 0.17.1."
  }
}

variable "enable_monitoring" {
  description = "Install kube-prometheus-stack and scrape Ray's metrics."
  type        = bool
  default     = true
}

variable "data_host_path" {
  description = "Host directory mounted into every Kind node at /oppen-data: checkpoints shared by all Ray pods."
  type        = string
  default     = "/tmp/oppen-kind-data"

  validation {
    condition     = startswith(var.data_host_path, "/")
    error_message = "data_host_path must be an absolute path."
  }
}

variable "local_ports" {
  description = "Local ports that kuberay/bring-up.sh port-forwards to (the outputs' URLs)."
  type        = object({ dashboard = number, mlflow = number, serve = number, grafana = number })
  default     = { dashboard = 8265, mlflow = 5000, serve = 8000, grafana = 3000 }

  validation {
    condition     = alltrue([for p in values(var.local_ports) : p >= 1024 && p <= 65535])
    error_message = "local_ports must be unprivileged ports (1024-65535)."
  }
}

variable "tenants" {
  description = "Tenants of the platform's REST API: Terraform makes one random token each, in the Secret oppen-tenant-tokens."
  type        = list(string)
  default     = ["default"]

  validation {
    condition = length(var.tenants) >= 1 && length(distinct(var.tenants)) == length(var.tenants) && alltrue([
      for t in var.tenants : can(regex("^[a-z0-9][-a-z0-9_]{0,62}$", t))
    ])
    error_message = "tenants must name at least one tenant, each once, in 1-63 lowercase letters, digits, '-' or '_', starting alphanumeric."
  }
}
