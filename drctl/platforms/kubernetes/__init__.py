"""The Kubernetes platform: model instances are pods, the load balancer is the model's Service."""
