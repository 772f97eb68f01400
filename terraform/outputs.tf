output "kubeconfig_context" {
  description = "kubectl context of the Kind cluster."
  value       = "kind-${var.cluster_name}"
}

output "ray_dashboard_url" {
  description = "Ray dashboard and Jobs API of the training cluster (RAY_ADDRESS for `oppen`), once port-forwarded."
  value       = "http://127.0.0.1:${var.local_ports.dashboard}"
}

output "mlflow_url" {
  description = "MLflow tracking server (MLFLOW_TRACKING_URI), once port-forwarded."
  value       = "http://127.0.0.1:${var.local_ports.mlflow}"
}

output "platform_api_url" {
  description = "The platform's REST API and cost-forecast service on Ray Serve, once port-forwarded."
  value       = "http://127.0.0.1:${var.local_ports.serve}/v1"
}

output "agent_url" {
  description = "POST here to talk to the agent, once port-forwarded."
  value       = "http://127.0.0.1:${var.local_ports.serve}/v1/agent"
}

output "grafana_url" {
  description = "Grafana of kube-prometheus-stack, once port-forwarded (null without monitoring)."
  value       = var.enable_monitoring ? "http://127.0.0.1:${var.local_ports.grafana}" : null
}

output "port_forwards" {
  description = "What kuberay/bring-up.sh runs to make the URLs above answer."

  value = {
    dashboard = "kubectl -n ${local.namespace} port-forward svc/oppen-head-svc ${var.local_ports.dashboard}:8265"
    mlflow    = "kubectl -n ${local.namespace} port-forward svc/oppen-mlflow ${var.local_ports.mlflow}:5000"
    serve     = "kubectl -n ${local.namespace} port-forward svc/oppen-serve-serve-svc ${var.local_ports.serve}:8000"
    grafana   = "kubectl -n monitoring port-forward svc/kube-prometheus-stack-grafana ${var.local_ports.grafana}:80"
  }
}
