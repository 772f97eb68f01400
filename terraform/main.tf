# A Kind cluster with the KubeRay operator, kube-prometheus-stack, MLflow on PostgreSQL and the
# platform: the training RayCluster, the Serve apps as a RayService, the queue's dispatcher.
# The manifests are kuberay/*.yaml as written (CI validates them); only the worker groups'
# maxima come from variables. kuberay/bring-up.sh runs this in two steps (see its comments).

locals {
  manifests   = "${path.module}/../kuberay"
  namespace   = "oppen"
  ray_cluster = yamldecode(file("${local.manifests}/ray-cluster.kind.yaml"))

  ray_cluster_scaled = merge(local.ray_cluster, {
    spec = merge(local.ray_cluster.spec, {
      workerGroupSpecs = [
        for group in local.ray_cluster.spec.workerGroupSpecs : merge(group, {
          maxReplicas = group.groupName == "gpu" ? var.gpu_worker_max : var.cpu_worker_max
        })
      ]
    })
  })

  gpu_taint_patch = <<-EOT
    kind: JoinConfiguration
    nodeRegistration:
      taints:
        - key: nvidia.com/gpu
          value: "present"
          effect: NoSchedule
  EOT
}

resource "kind_cluster" "oppen" {
  name           = var.cluster_name
  node_image     = "kindest/node:${var.kubernetes_version}"
  wait_for_ready = true

  kind_config {
    kind        = "Cluster"
    api_version = "kind.x-k8s.io/v1alpha4"

    node {
      role = "control-plane"

      extra_mounts {
        host_path      = var.data_host_path
        container_path = "/oppen-data"
      }
    }

    dynamic "node" {
      for_each = range(var.cpu_nodes)
      content {
        role = "worker"

        extra_mounts {
          host_path      = var.data_host_path
          container_path = "/oppen-data"
        }
      }
    }

    # Kind has no native GPU support (kubernetes-sigs/kind#3164). This is nvkind's method: with
    # accept-nvidia-visible-devices-as-volume-mounts = true in the host's NVIDIA container
    # runtime config, mounting /dev/null here hands every host GPU to the node container; the
    # device plugin below then advertises them as nvidia.com/gpu. The taint keeps CPU pods off.
    dynamic "node" {
      for_each = range(var.gpu_nodes)
      content {
        role                   = "worker"
        labels                 = { "nvidia.com/gpu.present" = "true" }
        kubeadm_config_patches = [local.gpu_taint_patch]

        extra_mounts {
          host_path      = var.data_host_path
          container_path = "/oppen-data"
        }

        extra_mounts {
          host_path      = "/dev/null"
          container_path = "/var/run/nvidia-container-devices/all"
        }
      }
    }
  }
}

provider "kind" {}

provider "helm" {
  kubernetes {
    host                   = kind_cluster.oppen.endpoint
    client_certificate     = kind_cluster.oppen.client_certificate
    client_key             = kind_cluster.oppen.client_key
    cluster_ca_certificate = kind_cluster.oppen.cluster_ca_certificate
  }
}

provider "kubernetes" {
  host                   = kind_cluster.oppen.endpoint
  client_certificate     = kind_cluster.oppen.client_certificate
  client_key             = kind_cluster.oppen.client_key
  cluster_ca_certificate = kind_cluster.oppen.cluster_ca_certificate
}

provider "kubectl" {
  host                   = kind_cluster.oppen.endpoint
  client_certificate     = kind_cluster.oppen.client_certificate
  client_key             = kind_cluster.oppen.client_key
  cluster_ca_certificate = kind_cluster.oppen.cluster_ca_certificate
  load_config_file       = false
}

# --------------------------------------------------------------------------- operators

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_operator_version
  namespace        = "kuberay-system"
  create_namespace = true
  wait             = true
}

resource "helm_release" "kube_prometheus_stack" {
  count            = var.enable_monitoring ? 1 : 0
  name             = "kube-prometheus-stack"
  repository       = "https://prometheus-community.github.io/helm-charts"
  chart            = "kube-prometheus-stack"
  version          = var.kube_prometheus_stack_version
  namespace        = "monitoring"
  create_namespace = true
  wait             = true

  # Pick up PodMonitors/ServiceMonitors from every namespace, not only the chart's own.
  values = [yamlencode({
    prometheus = {
      prometheusSpec = {
        podMonitorSelectorNilUsesHelmValues     = false
        serviceMonitorSelectorNilUsesHelmValues = false
        ruleSelectorNilUsesHelmValues           = false
      }
    }
  })]
}

resource "helm_release" "nvidia_device_plugin" {
  count            = var.gpu_nodes > 0 ? 1 : 0
  name             = "nvidia-device-plugin"
  repository       = "https://nvidia.github.io/k8s-device-plugin"
  chart            = "nvidia-device-plugin"
  version          = var.nvidia_device_plugin_version
  namespace        = "nvidia-device-plugin"
  create_namespace = true

  values = [yamlencode({
    nodeSelector = { "nvidia.com/gpu.present" = "true" }
  })]
}

# --------------------------------------------------------------------------- secrets

resource "kubectl_manifest" "namespace" {
  yaml_body = file("${local.manifests}/namespace.yaml")
}

resource "random_password" "postgres" {
  length  = 32
  special = false
}

resource "random_password" "ray_token" {
  length  = 64
  special = false
}

resource "kubernetes_secret_v1" "postgres" {
  metadata {
    name      = "oppen-postgres"
    namespace = local.namespace
  }
  data       = { password = random_password.postgres.result }
  depends_on = [kubectl_manifest.namespace]
}

# Ray token auth for both Ray clusters (authOptions.secretName in the manifests).
resource "kubernetes_secret_v1" "ray_token" {
  metadata {
    name      = "oppen-ray-token"
    namespace = local.namespace
  }
  data       = { auth_token = random_password.ray_token.result }
  depends_on = [kubectl_manifest.namespace]
}

# The REST API's tenant tokens, {token: tenant} as JSON: the RayService requires this Secret, so
# that its API, on the pod's network, never runs without them. One random token per tenant.
resource "random_password" "tenant_tokens" {
  for_each = toset(var.tenants)
  length   = 48
  special  = false
}

resource "kubernetes_secret_v1" "tenant_tokens" {
  metadata {
    name      = "oppen-tenant-tokens"
    namespace = local.namespace
  }
  data       = { tokens = jsonencode({ for tenant in var.tenants : random_password.tenant_tokens[tenant].result => tenant }) }
  depends_on = [kubectl_manifest.namespace]
}

# --------------------------------------------------------------------------- network policies

# Default-deny ingress in the namespace, and who may reach each Ray cluster's ports. Applied
# before the Ray pods start, so that they are never reachable without them.
data "kubectl_file_documents" "network_policies" {
  content = file("${local.manifests}/network-policies.yaml")
}

resource "kubectl_manifest" "network_policies" {
  for_each   = data.kubectl_file_documents.network_policies.manifests
  yaml_body  = each.value
  depends_on = [kubectl_manifest.namespace]
}

# --------------------------------------------------------------------------- the platform

data "kubectl_file_documents" "mlflow" {
  content = file("${local.manifests}/mlflow.yaml")
}

resource "kubectl_manifest" "mlflow" {
  for_each   = data.kubectl_file_documents.mlflow.manifests
  yaml_body  = each.value
  depends_on = [kubernetes_secret_v1.postgres]
}

data "kubectl_file_documents" "platform" {
  content = file("${local.manifests}/platform.yaml")
}

resource "kubectl_manifest" "platform" {
  for_each   = data.kubectl_file_documents.platform.manifests
  yaml_body  = each.value
  depends_on = [kubectl_manifest.mlflow, kubernetes_secret_v1.ray_token]
}

resource "kubectl_manifest" "ray_cluster" {
  yaml_body = yamlencode(local.ray_cluster_scaled)
  depends_on = [
    helm_release.kuberay_operator, kubernetes_secret_v1.ray_token, kubectl_manifest.mlflow,
    kubectl_manifest.network_policies,
  ]
}

resource "kubectl_manifest" "ray_service" {
  yaml_body = file("${local.manifests}/ray-service.oppen.yaml")
  depends_on = [
    helm_release.kuberay_operator, kubectl_manifest.platform, kubectl_manifest.ray_cluster,
    kubernetes_secret_v1.tenant_tokens, kubectl_manifest.network_policies,
  ]
}

# --------------------------------------------------------------------------- monitoring

data "kubectl_file_documents" "monitoring" {
  content = file("${local.manifests}/monitoring.yaml")
}

# PodMonitors for Ray and the dispatcher, and the alert rules, for kube-prometheus-stack.
resource "kubectl_manifest" "monitoring" {
  for_each   = var.enable_monitoring ? data.kubectl_file_documents.monitoring.manifests : {}
  yaml_body  = each.value
  depends_on = [helm_release.kube_prometheus_stack, kubectl_manifest.namespace]
}

# configs/grafana/*.json, picked up by the Grafana sidecar through its label.
resource "kubernetes_config_map_v1" "grafana_dashboards" {
  count = var.enable_monitoring ? 1 : 0

  metadata {
    name      = "oppen-grafana-dashboards"
    namespace = "monitoring"
    labels    = { grafana_dashboard = "1" }
  }

  data = {
    for name in fileset("${path.module}/../configs/grafana", "*.json") :
    name => file("${path.module}/../configs/grafana/${name}")
  }

  depends_on = [helm_release.kube_prometheus_stack]
}
